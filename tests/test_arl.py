"""ARL: weights, prototypes and bias term against hand computations; DDP agreement; a real fit."""

from __future__ import annotations

import io
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from adaptalign.callbacks.arl import ARL
from adaptalign.callbacks.arl_terms import (
    arl_weights,
    auxiliary_logits,
    auxiliary_terms,
    inverse_entropy_shares,
    update_prototypes,
)
from adaptalign.common.errors import ConfigurationError
from adaptalign.datamodules.clusters import ClusterConfig
from adaptalign.datamodules.datamodule import AlignmentDataModule
from adaptalign.datamodules.generated import GeneratedConfig
from adaptalign.lightning_modules.controls import Controls, StepEmbeddings, scale_gradient
from tests.helpers.builders import quiet_trainer, tiny_module
from tests.helpers.distributed import run_distributed

# ----------------------------------------------------------------------------- helpers


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def entropy(values: list[float]) -> float:
    return -sum(p * math.log(p) for p in softmax(values))


def hand_shares(h: list[float], floor: float = 0.3) -> list[float]:
    """q as the reference implementation computes it: entropy shares, floored, inverted, shared."""
    s_image, s_text = max(h[0] / (h[0] + h[1]), floor), max(h[1] / (h[0] + h[1]), floor)
    return [(1 / s_image) / (1 / s_image + 1 / s_text), (1 / s_text) / (1 / s_image + 1 / s_text)]


def hand_weights(
    h: list[float], d: list[float], temperature: float, floor: float = 0.3
) -> list[float]:
    q_image, q_text = hand_shares(h, floor)
    d_image, d_text = d[0] / (d[0] + d[1]), d[1] / (d[0] + d[1])
    return softmax([temperature * d_text * q_image, temperature * d_image * q_text])


class FakeModule:
    """What the hooks touch: controls, a device and ``log``."""

    def __init__(self) -> None:
        self.controls = Controls()
        self.device = torch.device("cpu")
        self.logged: dict[str, float] = {}

    def log(self, name: str, value: object, **_: object) -> None:
        self.logged[name] = float(value)  # type: ignore[arg-type]


def run_step(
    arl: ARL, module: FakeModule, epoch: int, image: torch.Tensor, text: torch.Tensor, labels
) -> Controls:
    """One training step as the system runs it: controls written, consumed, outputs read."""
    trainer = SimpleNamespace(current_epoch=epoch)
    batch = {"cluster": labels}
    arl.on_train_batch_start(trainer, module, batch, 0)
    controls, module.controls = module.controls, Controls()
    weight, fn = controls.extra_losses["arl_bias"]
    term = fn(StepEmbeddings(image, text, image, text, batch))
    outputs = {
        "loss": weight * term.value,
        "controls": controls,
        "auxiliaries": {"arl_bias": term.auxiliaries},
    }
    arl.on_train_batch_end(trainer, module, outputs, batch, 0)
    return controls


def make_steps(steps: int, rows: int, dim: int = 6, seed: int = 0) -> list[tuple]:
    """Unit-length image/text rows per step; clusters 0..2 appear, cluster 2 only from step 2."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        image = F.normalize(torch.randn(rows, dim, generator=g), dim=1)
        text = F.normalize(torch.randn(rows, dim, generator=g), dim=1)
        labels = torch.randint(0, 3 if step >= 2 else 2, (rows,), generator=g)
        labels[0] = step % 2
        out.append((image, text, labels))
    return out


# ------------------------------------------------------------------------- pure math


def test_weights_from_logits_by_hand() -> None:
    """Entropy, dependence, cross-entropy and weights of a 2-row batch, all computed by hand."""
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    seen = torch.tensor([True, True, False])
    image = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.8, 0.6], [0.6, 0.8], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 2])  # the third row's cluster has no prototype: left out
    logits = auxiliary_logits(image, prototypes, seen, aux_temperature=0.5)
    assert torch.allclose(logits[:, :2], torch.tensor([[1.2, 1.6], [2.0, 0.0], [0.0, 2.0]]))
    assert torch.isinf(logits[:, 2]).all() and (logits[:, 2] < 0).all()

    terms = auxiliary_terms(image, text, labels, prototypes, seen, aux_temperature=0.5)
    assert terms.rows == 2
    image_logits = [[1.2, 1.6], [2.0, 0.0]]
    text_logits = [[1.6, 1.2], [1.2, 1.6]]
    h = [
        (entropy(image_logits[0]) + entropy(image_logits[1])) / 2,
        (entropy(text_logits[0]) + entropy(text_logits[1])) / 2,
    ]
    d = [(1.4 + 1.0) / 2, (1.4 + 1.4) / 2]  # mean |logit| per row, then over rows
    ce_image = (-math.log(softmax([1.2, 1.6])[0]) - math.log(softmax([2.0, 0.0])[1])) / 2
    ce_text = (-math.log(softmax([1.6, 1.2])[0]) - math.log(softmax([1.2, 1.6])[1])) / 2
    assert (terms.entropy_sum / terms.rows).tolist() == pytest.approx(h, abs=1e-6)
    assert (terms.dependence_sum / terms.rows).tolist() == pytest.approx(d, abs=1e-6)
    assert terms.cross_entropy.tolist() == pytest.approx([ce_image, ce_text], abs=1e-6)

    weights = arl_weights(terms.entropy_sum / 2, terms.dependence_sum / 2, temperature=4.0)
    assert weights.tolist() == pytest.approx(hand_weights(h, d, 4.0), abs=1e-6)


def test_weights_favour_the_confident_modality_the_other_depends_on() -> None:
    # q = (2/3, 1/3), d = (0.75, 0.25): scores (0.25 * 2/3, 0.75 * 1/3) = (1/6, 1/4).
    w = arl_weights(torch.tensor([0.8, 1.6]), torch.tensor([3.0, 1.0]), temperature=4.0)
    expected = softmax([4 / 6, 4 / 4])
    assert w.tolist() == pytest.approx(expected, abs=1e-7)
    assert float(w.sum()) == pytest.approx(1.0)
    zero_t = arl_weights(torch.tensor([0.8, 1.6]), torch.tensor([3.0, 1.0]), temperature=0.0)
    assert zero_t.tolist() == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_entropy_share_floor_by_hand(order: tuple[int, int]) -> None:
    """Entropy shares (0.1, 0.9) are floored to (0.3, 0.9): q = (0.75, 0.25), not (0.9, 0.1)."""
    h = torch.tensor([0.2, 1.8])[list(order)]  # shares 0.1 and 0.9, either modality confident
    confident, other = order.index(0), order.index(1)
    plain = inverse_entropy_shares(h, None)
    assert plain[confident] == pytest.approx(0.9) and plain[other] == pytest.approx(0.1)
    floored = inverse_entropy_shares(h, 0.3)
    # 1 / 0.3 = 10/3 and 1 / 0.9 = 10/9, so q = (10/3) / (40/9) = 0.75 for the confident one.
    assert floored[confident] == pytest.approx(0.75) and floored[other] == pytest.approx(0.25)
    assert floored.tolist() == pytest.approx(hand_shares(h.tolist(), 0.3))
    # The weights are the softmax of the scores built from the floored shares.
    d = torch.tensor([0.4, 0.6])
    q = [0.75, 0.25] if order == (0, 1) else [0.25, 0.75]
    expected = softmax([4.0 * 0.6 * q[0], 4.0 * 0.4 * q[1]])
    assert arl_weights(h, d, 4.0).tolist() == pytest.approx(expected, abs=1e-7)  # the default
    assert arl_weights(h, d, 4.0, 0.3).tolist() == pytest.approx(expected, abs=1e-7)
    unfloored = softmax([4.0 * 0.6 * float(plain[0]), 4.0 * 0.4 * float(plain[1])])
    assert arl_weights(h, d, 4.0, None).tolist() == pytest.approx(unfloored, abs=1e-7)
    assert abs(unfloored[0] - expected[0]) > 0.05


def test_entropy_share_floor_bounds_and_its_off_switch() -> None:
    # Shares of 0.3 or more are left alone: (0.3, 0.7) gives q = (0.7, 0.3) with or without it.
    assert inverse_entropy_shares(torch.tensor([0.6, 1.4]), 0.3).tolist() == pytest.approx(
        [0.7, 0.3]
    )
    # The confident modality's q is at most 1 / (1 + floor), its partner's at least f / (1 + f).
    extreme = inverse_entropy_shares(torch.tensor([1e-6, 1.0]), 0.3)
    assert extreme.tolist() == pytest.approx([1 / 1.3, 0.3 / 1.3], abs=1e-5)
    # Off (None or 0): exactly the plain inverse-entropy share the weights used without a floor.
    h = torch.tensor([0.3137, 2.2411])
    inverse = 1.0 / h
    for off in (None, 0, 0.0):
        assert torch.equal(inverse_entropy_shares(h, off), inverse / inverse.sum())
    assert not torch.allclose(inverse_entropy_shares(h, 0.3), inverse / inverse.sum())


def test_callback_weights_use_the_configured_floor() -> None:
    h, d = [0.2, 1.8], [0.3, 0.7]
    for floor, hand_floor in ((0.3, 0.3), (0.2, 0.2), (None, 0.0), (0.0, 0.0)):
        arl = ARL(num_clusters=3, warmup_epochs=0, entropy_share_floor=floor)
        arl.entropy, arl.dependence = torch.tensor(h), torch.tensor(d)
        fake = FakeModule()
        arl.on_train_batch_start(SimpleNamespace(current_epoch=0), fake, {"cluster": 0}, 0)
        w = hand_weights(h, d, 4.0, hand_floor)
        assert fake.controls.tower_grad_scale == pytest.approx((1 + w[0], 1 + w[1]), abs=1e-6)
    assert ARL().entropy_share_floor == 0.3


def test_prototype_ema_by_hand_without_gradients() -> None:
    prototypes = torch.zeros(4, 2)
    seen = torch.zeros(4, dtype=torch.bool)
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], requires_grad=True)
    labels = torch.tensor([0, 0, 2])
    prototypes, seen = update_prototypes(prototypes, seen, rows, labels, momentum=0.9)
    assert not prototypes.requires_grad
    assert seen.tolist() == [True, False, True, False]
    r = 1 / math.sqrt(2)  # first observation: the normalised mean of (1, 0) and (0, 1)
    expected = torch.tensor([[r, r], [0, 0], [0.6, 0.8], [0, 0]])
    assert torch.allclose(prototypes, expected, atol=1e-6)

    new = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    prototypes, seen = update_prototypes(prototypes, seen, new, torch.tensor([0, 1]), 0.9)
    blended = [0.9 * r + 0.1 * 0.0, 0.9 * r + 0.1 * 1.0]  # EMA, then re-normalised
    norm = math.hypot(*blended)
    assert prototypes[0].tolist() == pytest.approx([b / norm for b in blended], abs=1e-6)
    assert prototypes[1].tolist() == pytest.approx([1.0, 0.0])  # first sight of cluster 1
    assert prototypes[2].tolist() == pytest.approx([0.6, 0.8])  # absent: unchanged
    assert seen.tolist() == [True, True, True, False]
    assert prototypes[3].tolist() == [0.0, 0.0]  # never seen: zero, and masked out
    logits = auxiliary_logits(torch.tensor([[1.0, 0.0]]), prototypes, seen, 0.1)
    assert torch.isneginf(logits[0, 3]) and torch.isfinite(logits[0, :3]).all()


def test_bias_term_gradient_reaches_embeddings_not_prototypes() -> None:
    arl = ARL(num_clusters=3, aux_temperature=0.5)
    arl.observe(
        torch.zeros(2),
        torch.zeros(2),
        0,
        torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        torch.tensor([0, 1]),
    )
    arl.prototypes.requires_grad_(True)  # even so, the bias term must not train them
    image = torch.tensor([[0.6, 0.8], [1.0, 0.0]], requires_grad=True)
    text = torch.tensor([[0.8, 0.6], [0.0, 1.0]], requires_grad=True)
    batch = {"cluster": torch.tensor([0, 1])}
    loss = arl.bias_term()(StepEmbeddings(image, text, image, text, batch)).value
    loss.backward()
    assert arl.prototypes.grad is None
    # d CE / d emb_row = scale * (softmax - onehot) @ prototypes / rows, prototypes = identity.
    for emb, grad in ((image, image.grad), (text, text.grad)):
        for row, label in enumerate((0, 1)):
            p = softmax([2 * float(emb[row, 0].detach()), 2 * float(emb[row, 1].detach())])
            expected = [2 * (p[k] - (k == label)) / 2 for k in range(2)]
            assert grad[row].tolist() == pytest.approx(expected, abs=1e-6)


def test_no_prototype_yet_gives_a_zero_bias_term_that_keeps_the_graph() -> None:
    arl = ARL(num_clusters=3)
    image = torch.tensor([[0.6, 0.8]], requires_grad=True)
    batch = {"cluster": torch.tensor([1])}
    loss = arl.bias_term()(StepEmbeddings(image, image, image, image, batch)).value
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert image.grad is not None and float(image.grad.abs().sum()) == 0.0


# --------------------------------------------------------------------- gradient scale


def test_scale_gradient_gradcheck_in_double() -> None:
    x = torch.randn(4, 3, dtype=torch.double, requires_grad=True)
    scale = 1.7
    assert torch.equal(scale_gradient(x, scale), x)  # identity forward
    # A forward of ``scale * x`` whose own backward is the identity: the composition's numerical
    # and analytical Jacobians agree only if scale_gradient multiplies the gradient by ``scale``.
    assert torch.autograd.gradcheck(
        lambda v: scale_gradient(v + (scale - 1) * v.detach(), scale), (x,)
    )
    # On its own the analytical Jacobian is deliberately not the forward's (the identity).
    assert not torch.autograd.gradcheck(
        lambda v: scale_gradient(v, scale), (x,), raise_exception=False
    )


@pytest.mark.slow
def test_tower_gradients_are_one_plus_w_times(tiny_text_model: str) -> None:
    """The scales ARL writes multiply each tower's gradient, the loss value unchanged."""
    module = tiny_module(tiny_text_model, temperature=0.1)
    arl = ARL(num_clusters=3, warmup_epochs=0)
    arl.prototypes = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(3)))
    arl.seen = torch.tensor([True, True, False])
    arl.entropy, arl.dependence = torch.tensor([0.5, 0.9]), torch.tensor([0.3, 0.7])
    fake = FakeModule()
    batch = {"cluster": torch.tensor([0, 1, 1, 2, 0])}
    arl.on_train_batch_start(SimpleNamespace(current_epoch=0), fake, batch, 0)
    written = fake.controls
    w = hand_weights([0.5, 0.9], [0.3, 0.7], 4.0)
    assert written.tower_grad_scale == pytest.approx((1 + w[0], 1 + w[1]), abs=1e-6)

    g = torch.Generator().manual_seed(4)
    base_image = F.normalize(torch.randn(5, 16, generator=g), dim=1)
    base_text = F.normalize(torch.randn(5, 16, generator=g), dim=1)

    def grads(scale: tuple[float, float]) -> tuple[float, torch.Tensor, torch.Tensor]:
        image = base_image.clone().requires_grad_(True)
        text = base_text.clone().requires_grad_(True)
        controls = Controls(tower_grad_scale=scale, extra_losses=written.extra_losses)
        loss, parts, _, _ = module.contrastive_loss(image, text, batch, controls)
        assert float(parts["arl_bias"]) > 0
        loss.backward()
        return float(loss.detach()), image.grad, text.grad

    loss_w, image_w, text_w = grads(written.tower_grad_scale)
    loss_1, image_1, text_1 = grads((1.0, 1.0))
    assert loss_w == pytest.approx(loss_1, abs=1e-7)
    assert torch.allclose(image_w, (1 + w[0]) * image_1, atol=1e-6)
    assert torch.allclose(text_w, (1 + w[1]) * text_1, atol=1e-6)
    assert not torch.allclose(image_w, image_1, atol=1e-4)


# ----------------------------------------------------------------- steps and warm-up


def test_warmup_gives_equal_weights_then_arl_weights() -> None:
    arl = ARL(num_clusters=3, warmup_epochs=2)
    module = FakeModule()
    steps = make_steps(5, rows=6)
    for image, text, labels in steps[:4]:
        controls = run_step(arl, module, 1, image, text, labels)
        assert controls.tower_grad_scale == (1.5, 1.5)
    assert module.logged["arl/w_image"] == module.logged["arl/w_text"] == 0.5
    h, d = arl.entropy.tolist(), arl.dependence.tolist()
    image, text, labels = steps[4]
    controls = run_step(arl, module, 2, image, text, labels)
    w = hand_weights(h, d, 4.0)
    assert controls.tower_grad_scale == pytest.approx((1 + w[0], 1 + w[1]), abs=1e-6)
    assert abs(w[0] - 0.5) > 1e-4
    for name in ("entropy_image", "entropy_text", "dependence_image", "bias_loss"):
        assert f"arl/{name}" in module.logged
    assert module.logged["arl/dependence_image"] + module.logged["arl/dependence_text"] == (
        pytest.approx(1.0)
    )


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, [1.0, 1.0, 4.0, 4.0]),  # the default: 1 in the warm-up, gamma after
        ({"gamma": 0.5}, [1.0, 1.0, 0.5, 0.5]),
        ({"warmup_bias_weight": 0.25}, [0.25, 0.25, 4.0, 4.0]),
        ({"warmup_bias_weight": 0.0}, [0.0, 0.0, 4.0, 4.0]),
        ({"warmup_bias_weight": None}, [4.0, 4.0, 4.0, 4.0]),  # off: gamma throughout
        ({"warmup_epochs": 0}, [4.0, 4.0, 4.0, 4.0]),  # no warm-up, no warm-up weight
    ],
)
def test_bias_weight_per_epoch(settings: dict, expected: list[float]) -> None:
    """The weight the bias term gets in the controls: warm-up epochs 0 and 1, then 2 and 3."""
    arl = ARL(num_clusters=3, **{"warmup_epochs": 2, **settings})
    module = FakeModule()
    steps = make_steps(4, rows=6)
    for epoch, (image, text, labels) in enumerate(steps):
        controls = run_step(arl, module, epoch, image, text, labels)
        weight, _ = controls.extra_losses["arl_bias"]
        assert weight == expected[epoch], epoch
        assert module.logged["arl/bias_weight"] == expected[epoch]


def test_the_loss_adds_the_bias_term_at_its_epoch_weight(tiny_text_model: str) -> None:
    """What the system optimises: the alignment loss plus 1 x bias in warm-up, gamma x after."""
    module = tiny_module(tiny_text_model, temperature=0.1)
    arl = ARL(num_clusters=3, warmup_epochs=1, gamma=4.0)
    arl.prototypes = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(3)))
    arl.seen = torch.tensor([True, True, True])
    arl.entropy, arl.dependence = torch.tensor([0.5, 0.9]), torch.tensor([0.3, 0.7])
    g = torch.Generator().manual_seed(4)
    image = F.normalize(torch.randn(5, 16, generator=g), dim=1)
    text = F.normalize(torch.randn(5, 16, generator=g), dim=1)
    batch = {"cluster": torch.tensor([0, 1, 1, 2, 0])}
    alignment = module.contrastive_loss(image, text, batch, Controls()).loss
    for epoch, weight in ((0, 1.0), (1, 4.0)):
        fake = FakeModule()
        arl.on_train_batch_start(SimpleNamespace(current_epoch=epoch), fake, batch, 0)
        loss, parts, _, _ = module.contrastive_loss(image, text, batch, fake.controls)
        bias = float(parts["arl_bias"])
        assert bias > 1.0
        expected = float(alignment.detach()) + weight * bias
        assert float(loss.detach()) == pytest.approx(expected, abs=1e-5), epoch


def test_statistics_are_an_ema_of_step_statistics() -> None:
    arl = ARL(num_clusters=3, warmup_epochs=0, momentum=0.8)
    module = FakeModule()
    history = []
    for image, text, labels in make_steps(4, rows=5):
        if arl.seen is not None:  # what this step's statistics will be, from the old prototypes
            t = auxiliary_terms(image, text, labels, arl.prototypes, arl.seen, 0.1)
            raw = t.dependence_sum / t.rows
            history.append((t.entropy_sum / t.rows, raw / raw.sum()))
        run_step(arl, module, 0, image, text, labels)
    (h1, d1), (h2, d2), (h3, d3) = history
    h = 0.8 * (0.8 * h1 + 0.2 * h2) + 0.2 * h3
    d = 0.8 * (0.8 * d1 + 0.2 * d2) + 0.2 * d3
    assert torch.allclose(arl.entropy, h, atol=1e-6)
    assert torch.allclose(arl.dependence, d, atol=1e-6)


def test_resume_from_state_dict_is_exact() -> None:
    steps = make_steps(8, rows=6)
    full, module = ARL(num_clusters=4, warmup_epochs=0), FakeModule()
    full_scales = [run_step(full, module, 0, *s).tower_grad_scale for s in steps]

    first, module = ARL(num_clusters=4, warmup_epochs=0), FakeModule()
    for s in steps[:4]:
        run_step(first, module, 0, *s)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = ARL(warmup_epochs=0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    resumed_scales = [run_step(resumed, module, 0, *s).tower_grad_scale for s in steps[4:]]
    assert resumed_scales == full_scales[4:]
    for key, value in full.state_dict().items():
        restored = resumed.state_dict()[key]
        assert restored == value if key == "num_clusters" else torch.equal(restored, value), key
    assert full.seen.tolist() == [True, True, True, False]
    assert full.prototypes[3].abs().sum() == 0
    assert torch.allclose(full.prototypes[:3].norm(dim=1), torch.ones(3))


# --------------------------------------------------------------------------- DDP

RANK_ROWS = (3, 5)  # ranks hold different numbers of rows


def _ddp_worker(rank: int, world: int, out: str) -> None:
    torch.manual_seed(100 + rank)  # nothing below may depend on per-rank randomness
    arl, module = ARL(num_clusters=4, warmup_epochs=0), FakeModule()
    start = sum(RANK_ROWS[:rank])
    scales = []
    for image, text, labels in make_steps(5, rows=sum(RANK_ROWS)):
        rows = slice(start, start + RANK_ROWS[rank])
        scales.append(run_step(arl, module, 0, image[rows], text[rows], labels[rows]))
    state = arl.state_dict()
    flat = torch.cat([state["prototypes"].flatten(), state["entropy"], state["dependence"]])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "ranks disagree"
    torch.save({"scales": [c.tower_grad_scale for c in scales], "state": state}, out + f"{rank}")


@pytest.mark.ddp
def test_ddp_ranks_agree_and_match_one_process(tmp_path: Path) -> None:
    run_distributed(_ddp_worker, 2, tmp_path, str(tmp_path / "rank"))
    ranks = [torch.load(tmp_path / f"rank{r}", weights_only=False) for r in range(2)]
    assert ranks[0]["scales"] == ranks[1]["scales"]
    for key in ("prototypes", "seen", "entropy", "dependence"):
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key

    single, module = ARL(num_clusters=4, warmup_epochs=0), FakeModule()
    scales = [
        run_step(single, module, 0, *s).tower_grad_scale for s in make_steps(5, rows=sum(RANK_ROWS))
    ]
    flat = [value for pair in scales for value in pair]
    assert [v for pair in ranks[0]["scales"] for v in pair] == pytest.approx(flat, abs=1e-6)
    assert len({s for s in scales[2:]}) > 1  # the weights really moved
    state = single.state_dict()
    assert torch.equal(ranks[0]["state"]["seen"], state["seen"])
    for key in ("prototypes", "entropy", "dependence"):
        assert torch.allclose(ranks[0]["state"][key], state[key], atol=1e-6), key


# ------------------------------------------------------------------- fit and errors


class Probe(L.Callback):
    """Placed after ARL: what it wrote, what it should have written, and what the step used."""

    def __init__(self, arl: ARL) -> None:
        self.arl = arl
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        expected = (1.5, 1.5)
        if trainer.current_epoch >= self.arl.warmup_epochs:
            w = hand_weights(self.arl.entropy.tolist(), self.arl.dependence.tolist(), 4.0)
            expected = (1 + w[0], 1 + w[1])
        written = pl_module.controls.tower_grad_scale
        self.rows.append({"epoch": trainer.current_epoch, "written": written, "hand": expected})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        controls = outputs["controls"]
        self.rows[-1]["used"] = controls.tower_grad_scale
        self.rows[-1]["bias"] = controls.extra_losses["arl_bias"][0]


@pytest.mark.slow
def test_fit_applies_the_weights_and_the_bias_term(tiny_text_model: str, tmp_path: Path) -> None:
    data = AlignmentDataModule(
        generated=GeneratedConfig(num_train=48, num_val=8, num_test=8, image_size=32),
        cache_dir=str(tmp_path),
        clusters=ClusterConfig(num_clusters=4, text_model=tiny_text_model),
        batch_size=8,
    )
    arl = ARL(warmup_epochs=1)
    probe = Probe(arl)
    trainer = quiet_trainer(max_epochs=2, callbacks=[arl, probe], log_every_n_steps=1)
    trainer.fit(tiny_module(tiny_text_model), data)
    assert arl.num_clusters == len(data.caption_clusters.sizes) == 4
    assert len(probe.rows) == 12  # 48 / 8 batches x 2 epochs
    for row in probe.rows:
        assert row["used"] == row["written"]
        assert row["written"] == pytest.approx(row["hand"], abs=1e-6)
        assert row["bias"] == (1.0 if row["epoch"] == 0 else 4.0)  # warm-up weight, then gamma
    assert all(r["written"] == (1.5, 1.5) for r in probe.rows if r["epoch"] == 0)
    assert all(r["written"] != (1.5, 1.5) for r in probe.rows if r["epoch"] == 1)
    metrics = trainer.callback_metrics
    assert float(metrics["train/arl_bias"]) > 0
    assert float(metrics["train/arl_bias"]) == pytest.approx(float(metrics["arl/bias_loss"]))
    w_image, w_text = float(metrics["arl/w_image"]), float(metrics["arl/w_text"])
    assert probe.rows[-1]["written"] == pytest.approx((1 + w_image, 1 + w_text))
    present = torch.tensor(data.caption_clusters.sizes > 0)
    assert int(arl.seen.sum()) >= 2 and not bool((arl.seen & ~present).any())
    norms = arl.prototypes.norm(dim=1)
    assert torch.allclose(norms[arl.seen], torch.ones(int(arl.seen.sum())))
    assert float(norms[~arl.seen].sum()) == 0.0


def test_missing_clusters_is_a_clear_error() -> None:
    data = AlignmentDataModule(generated=GeneratedConfig(num_train=48, image_size=32))
    for datamodule in (data, None):
        trainer = SimpleNamespace(datamodule=datamodule)
        with pytest.raises(ConfigurationError, match=r"ARL needs caption clusters: set data\.clus"):
            ARL().on_fit_start(trainer, FakeModule())
    with pytest.raises(ConfigurationError, match="ARL needs caption clusters"):
        batch = {"texts": ["a red circle"]}
        ARL(num_clusters=2).on_train_batch_start(SimpleNamespace(current_epoch=0), None, batch, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gamma": -1.0}, r"gamma=-1.0; expected >= 0"),
        ({"momentum": 1.0}, r"momentum=1.0; expected a value in \[0, 1\)"),
        ({"aux_temperature": 0.0}, r"aux_temperature=0.0; expected > 0"),
        ({"warmup_epochs": -1}, r"warmup_epochs=-1; expected an integer >= 0"),
        ({"num_clusters": 0}, r"num_clusters=0; expected an integer >= 1"),
        ({"entropy_share_floor": 0.5}, r"entropy_share_floor=0.5; expected a value in \[0, 0.5\)"),
        ({"entropy_share_floor": -0.1}, r"entropy_share_floor=-0.1; expected a value in \[0, 0"),
        ({"entropy_share_floor": float("nan")}, r"entropy_share_floor=nan; expected a value in"),
        ({"entropy_share_floor": True}, r"entropy_share_floor=True; expected a value in"),
        ({"entropy_share_floor": "0.3"}, r"entropy_share_floor='0.3'; expected a value in"),
        ({"warmup_bias_weight": -1.0}, r"warmup_bias_weight=-1.0; expected a finite value >= 0"),
        ({"warmup_bias_weight": math.inf}, r"warmup_bias_weight=inf; expected a finite value"),
        ({"warmup_bias_weight": float("nan")}, r"warmup_bias_weight=nan; expected a finite"),
        ({"warmup_bias_weight": False}, r"warmup_bias_weight=False; expected a finite value"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ARL(**kwargs)
