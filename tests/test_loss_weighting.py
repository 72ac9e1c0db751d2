"""Loss weighting against hand computations, its exact cross-rank reduction, resume, a real fit."""

from __future__ import annotations

import io
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from adaptalign.callbacks.loss_weighting import (
    LossWeighting,
    reduce_signals,
    signals_from_sums,
    sufficient_sums,
)
from adaptalign.common.errors import ConfigurationError
from adaptalign.lightning_modules.controls import Controls, StepStatistics
from adaptalign.lightning_modules.losses import step_statistics
from tests.helpers.distributed import run_distributed


def stats(
    entropy: tuple[float, float] = (1.0, 1.0),
    p_mean: tuple[float, float] = (0.5, 0.5),
    p_var: tuple[float, float] = (0.01, 0.01),
    std: tuple[float, float] = (0.3, 0.3),
    rows: int = 4,
) -> StepStatistics:
    return StepStatistics(
        entropy=torch.tensor(entropy),
        positive_prob_mean=torch.tensor(p_mean),
        positive_prob_var=torch.tensor(p_var),
        similarity_std=torch.tensor(std),
        row_losses_i2t=torch.zeros(rows),
        row_losses_t2i=torch.zeros(rows),
        temperature=torch.full((rows,), 0.1),
    )


class StubModule:
    """What the callback touches on a LightningModule: controls, device and log."""

    def __init__(self) -> None:
        self.controls = Controls()
        self.device = torch.device("cpu")
        self.logged: dict[str, float] = {}

    def log(self, name: str, value: object, **kwargs: object) -> None:
        self.logged[name] = float(value)  # type: ignore[arg-type]


def step(callback: LossWeighting, module: StubModule, statistics: StepStatistics) -> Controls:
    """One training step as Lightning runs the hooks; returns the controls the step used."""
    module.controls = Controls()
    callback.on_train_batch_start(None, module, None, 0)  # type: ignore[arg-type]
    used = module.controls
    callback.on_train_batch_end(None, module, {"statistics": statistics}, None, 0)  # type: ignore[arg-type]
    return used


def weights(controls: Controls) -> list[float]:
    return [float(w) for w in controls.direction_weights]


# ------------------------------------------------------------------------- formulas by hand
@pytest.mark.parametrize(
    ("signal", "observed", "expected"),
    [
        ("variance", stats(p_var=(0.03, 0.01)), [1.5, 0.5]),  # 2 * 0.03 / 0.04, 2 * 0.01 / 0.04
        ("entropy", stats(entropy=(2.0, 3.0)), [0.8, 1.2]),  # 4 / 5, 6 / 5
        ("spread", stats(std=(0.2, 0.6)), [0.5, 1.5]),  # 0.4 / 0.8, 1.2 / 0.8
    ],
)
def test_each_signal_weights_by_hand(
    signal: str, observed: StepStatistics, expected: list[float]
) -> None:
    callback = LossWeighting(signal=signal, momentum=0.0, w_min=0.1, w_max=3.0)  # type: ignore[arg-type]
    module = StubModule()
    assert weights(step(callback, module, observed)) == [1.0, 1.0]  # nothing observed yet
    used = step(callback, module, stats())
    assert weights(used) == pytest.approx(expected, abs=1e-6)
    assert sum(weights(used)) == pytest.approx(2.0, abs=1e-6)
    assert module.logged["loss_weight/w_i2t"] == pytest.approx(expected[0], abs=1e-6)
    assert module.logged["loss_weight/w_t2i"] == pytest.approx(expected[1], abs=1e-6)


def test_ema_smoothing_over_steps_by_hand() -> None:
    callback = LossWeighting(signal="variance", momentum=0.5, w_min=0.1, w_max=3.0)
    module = StubModule()
    sequence = [stats(p_var=(0.02, 0.02)), stats(p_var=(0.06, 0.02)), stats(p_var=(0.10, 0.02))]
    used = [weights(step(callback, module, s)) for s in sequence]
    # s1 = (0.02, 0.02); s2 = 0.5 s1 + 0.5 x2 = (0.04, 0.02); s3 = (0.07, 0.02)
    assert used[0] == [1.0, 1.0]
    assert used[1] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert used[2] == pytest.approx([2 * 0.04 / 0.06, 2 * 0.02 / 0.06], abs=1e-6)
    assert callback.ema[0].tolist() == pytest.approx([0.07, 0.02], abs=1e-7)
    assert module.logged["loss_weight/signal_i2t"] == pytest.approx(0.07, abs=1e-7)
    assert module.logged["loss_weight/signal_t2i"] == pytest.approx(0.02, abs=1e-7)
    assert callback.steps == 3
    nxt = weights(step(callback, module, stats()))
    assert nxt == pytest.approx([2 * 0.07 / 0.09, 2 * 0.02 / 0.09], abs=1e-6)


def test_weights_are_clipped() -> None:
    callback = LossWeighting(signal="variance", momentum=0.0)  # clip to [0.5, 1.5]
    module = StubModule()
    step(callback, module, stats(p_var=(0.09, 0.01)))  # raw weights 1.8 and 0.2
    assert weights(step(callback, module, stats())) == pytest.approx([1.5, 0.5], abs=1e-6)
    narrow = LossWeighting(signal="variance", momentum=0.0, w_min=0.9, w_max=1.0)
    step(narrow, module, stats(p_var=(0.03, 0.01)))  # raw 1.5 and 0.5
    assert weights(step(narrow, module, stats())) == pytest.approx([1.0, 0.9], abs=1e-6)


def test_equal_zero_signals_give_equal_weights() -> None:
    callback = LossWeighting(signal="variance", momentum=0.0)
    module = StubModule()
    step(callback, module, stats(p_var=(0.0, 0.0)))
    assert weights(step(callback, module, stats())) == pytest.approx([1.0, 1.0])


def test_global_mode_scales_by_the_first_signal() -> None:
    callback = LossWeighting(signal="entropy", mode="global", momentum=0.5, w_max=1.4)
    module = StubModule()
    scales = []
    for x in [(2.0, 2.0), (4.0, 4.0), (1.0, 3.0), (1.0, 1.0), (0.0, 0.0)]:
        used = step(callback, module, stats(entropy=x))
        assert weights(used) == [1.0, 1.0]  # the directions are left alone
        scales.append(float(used.loss_scale))
    # EMA means: 2 (the reference), 3, 2.5, 1.75, 0.875 -> scales for the following steps
    assert scales == pytest.approx([1.0, 1.0, 1.4, 1.25, 0.875], abs=1e-6)  # 3 / 2 clipped to 1.4
    assert module.logged["loss_weight/scale"] == pytest.approx(0.875, abs=1e-6)
    assert float(step(callback, module, stats()).loss_scale) == pytest.approx(0.5)  # 0.4375


def test_global_mode_with_a_given_reference() -> None:
    callback = LossWeighting(
        signal="variance", mode="global", momentum=0.0, reference=0.04, w_min=0.1
    )
    module = StubModule()
    step(callback, module, stats(p_var=(0.01, 0.03)))  # mean 0.02
    assert float(step(callback, module, stats()).loss_scale) == pytest.approx(0.5, abs=1e-6)


def test_fixed_baseline_writes_its_weights_and_still_logs_the_signals() -> None:
    callback = LossWeighting(signal="fixed", momentum=0.5, fixed_weights=(0.7, 1.3))
    module = StubModule()
    for x in [(0.09, 0.01), (0.01, 0.09), (0.05, 0.05)]:
        used = step(callback, module, stats(p_var=x, entropy=(2.0, 4.0)))
        assert weights(used) == [0.7, 1.3]
        assert used.loss_scale == 1.0
    # variance EMA: (0.09, 0.01) -> (0.05, 0.05) -> (0.05, 0.05)
    assert module.logged["loss_weight/variance_i2t"] == pytest.approx(0.05, abs=1e-7)
    assert module.logged["loss_weight/entropy_t2i"] == pytest.approx(4.0)
    assert module.logged["loss_weight/spread_i2t"] == pytest.approx(0.3, abs=1e-7)
    assert module.logged["loss_weight/w_t2i"] == pytest.approx(1.3)


def test_weights_multiply_what_other_callbacks_wrote() -> None:
    callback = LossWeighting(signal="spread", momentum=0.0)
    module = StubModule()
    step(callback, module, stats(std=(0.2, 0.6)))
    module.controls = Controls(direction_weights=(2.0, 3.0))
    callback.on_train_batch_start(None, module, None, 0)  # type: ignore[arg-type]
    assert weights(module.controls) == pytest.approx([1.0, 4.5], abs=1e-6)


def test_logs_only_on_the_steps_lightning_writes() -> None:
    callback = LossWeighting(signal="variance", momentum=0.0)
    # Lightning writes every 50th step's logs; this first step's are not written.
    quiet = L.Trainer(log_every_n_steps=50, logger=False, enable_progress_bar=False)
    module = StubModule()
    for _ in range(2):
        module.controls = Controls()
        callback.on_train_batch_start(quiet, module, None, 0)  # type: ignore[arg-type]
        callback.on_train_batch_end(
            quiet, module, {"statistics": stats(p_var=(0.03, 0.01))}, None, 0
        )  # type: ignore[arg-type]
    assert module.logged == {}
    assert weights(module.controls) == pytest.approx([1.5, 0.5], abs=1e-6)  # still applied
    assert callback.steps == 2


# ------------------------------------------------------------------------- reduction
def global_rows(seed: int, size: int = 7, dim: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(size, dim, generator=g), dim=-1)
    text = F.normalize(image + 0.8 * torch.randn(size, dim, generator=g), dim=-1)
    return image @ text.T, text @ image.T


def rank_statistics(seed: int, rows: slice, tau: float = 0.1) -> StepStatistics:
    """The statistics a rank computes for its rows against all gathered columns."""
    sim_i2t, sim_t2i = global_rows(seed)
    targets = torch.arange(sim_i2t.shape[0])[rows]
    a, b = sim_i2t[rows], sim_t2i[rows]
    row_i2t = F.cross_entropy(a / tau, targets, reduction="none")
    row_t2i = F.cross_entropy(b / tau, targets, reduction="none")
    return step_statistics(a, b, targets, tau, row_i2t, row_t2i)


SPLIT = (slice(0, 3), slice(3, 7))  # uneven: 3 and 4 rows


def test_pooled_reduction_equals_the_statistic_of_the_concatenated_rows() -> None:
    parts = [rank_statistics(0, rows) for rows in SPLIT]
    full = rank_statistics(0, slice(0, 7))
    reduced = signals_from_sums(sum(sufficient_sums(p) for p in parts))
    assert reduced[0].tolist() == pytest.approx(full.positive_prob_var.tolist(), abs=1e-7)
    assert reduced[1].tolist() == pytest.approx(full.entropy.tolist(), abs=1e-6)
    # The naive mean of per-rank variances is not the pooled one (rank means differ here).
    naive = (parts[0].positive_prob_var + parts[1].positive_prob_var) / 2
    assert not torch.allclose(naive.double(), reduced[0], atol=1e-5)
    # Spread: row-weighted quadrature mean of the ranks' std (no similarity means to pool).
    expected = ((3 * parts[0].similarity_std ** 2 + 4 * parts[1].similarity_std ** 2) / 7).sqrt()
    assert reduced[2].tolist() == pytest.approx(expected.tolist(), abs=1e-7)
    assert (reduced[2] <= full.similarity_std.double() + 1e-7).all()
    # Without a process group the reduction is this rank's own statistic.
    alone = reduce_signals(full)
    assert alone[0].tolist() == pytest.approx(full.positive_prob_var.tolist(), abs=1e-7)
    assert alone[2].tolist() == pytest.approx(full.similarity_std.tolist(), abs=1e-7)


def test_a_rank_without_rows_adds_nothing() -> None:
    one = stats(p_var=(0.02, 0.04), entropy=(1.5, 2.5), rows=3)
    empty = stats(p_mean=(float("nan"),) * 2, p_var=(float("nan"),) * 2, rows=0)
    reduced = signals_from_sums(sufficient_sums(one) + sufficient_sums(empty))
    assert reduced[0].tolist() == pytest.approx([0.02, 0.04], abs=1e-7)
    assert reduced[1].tolist() == pytest.approx([1.5, 2.5], abs=1e-7)


CASES = (("variance", "directions"), ("entropy", "directions"), ("spread", "directions"))
CASES += (("variance", "global"),)
SEEDS = (0, 1, 2, 3)


def weight_trace(callback: LossWeighting, statistics: list[StepStatistics]) -> list[list[float]]:
    module = StubModule()
    trace = []
    for s in [*statistics, stats()]:
        used = step(callback, module, s)
        trace.append([*weights(used), float(used.loss_scale)])
    return trace


def _rank_work(rank: int, world: int, out_dir: str) -> None:
    statistics = [rank_statistics(seed, SPLIT[rank]) for seed in SEEDS]
    traces = {
        case: weight_trace(
            LossWeighting(signal=case[0], mode=case[1], momentum=0.5, w_min=0.1, w_max=5.0),  # type: ignore[arg-type]
            statistics,
        )
        for case in CASES
    }
    torch.save(traces, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.ddp
def test_ranks_with_different_rows_agree_on_the_single_process_weights(tmp_path: Path) -> None:
    run_distributed(_rank_work, 2, tmp_path, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    full = [rank_statistics(seed, slice(0, 7)) for seed in SEEDS]
    for case in CASES:
        assert ranks[0][case] == ranks[1][case], case  # bit-identical on both ranks
        if case[0] == "spread":
            continue  # pooled only approximately (see signals_from_sums)
        single = weight_trace(
            LossWeighting(signal=case[0], mode=case[1], momentum=0.5, w_min=0.1, w_max=5.0),  # type: ignore[arg-type]
            full,
        )
        for got, want in zip(ranks[0][case], single, strict=True):
            assert got == pytest.approx(want, abs=1e-6), case
        assert any(abs(w - 1.0) > 1e-3 for row in single[1:] for w in row), case  # not trivial
    # The ranks' own statistics differ, so agreement is the reduction's doing.
    own = [rank_statistics(0, rows).positive_prob_var for rows in SPLIT]
    assert not torch.allclose(own[0], own[1], atol=1e-4)


# ------------------------------------------------------------------------- state
@pytest.mark.parametrize("mode", ["directions", "global"])
def test_state_dict_round_trip_resumes_exactly(mode: str) -> None:
    sequence = [stats(p_var=(0.01 * (i + 1), 0.05 - 0.005 * i)) for i in range(6)]

    def make() -> LossWeighting:
        return LossWeighting(signal="variance", mode=mode, momentum=0.7, w_min=0.1, w_max=5.0)  # type: ignore[arg-type]

    def used(controls: Controls) -> list[float]:
        return [*weights(controls), float(controls.loss_scale)]

    full, module = make(), StubModule()
    reference = [used(step(full, module, s)) for s in sequence]
    first = make()
    for s in sequence[:3]:
        step(first, module, s)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.steps == 3
    after = [used(step(resumed, module, s)) for s in sequence[3:]]
    assert after == reference[3:]
    assert len({tuple(r) for r in reference[3:]}) == 3  # the weights move, so equality means much
    # A fresh callback fed only the tail does not continue the run.
    fresh = make()
    assert [used(step(fresh, module, s)) for s in sequence[3:]] != reference[3:]


def test_state_key_tells_instances_apart() -> None:
    keys = {LossWeighting(signal=s).state_key for s in ("variance", "entropy")}
    keys.add(LossWeighting(signal="variance", mode="global").state_key)
    assert len(keys) == 3


# ------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"signal": "loss"}, r"signal='loss'; expected one of"),
        ({"mode": "both"}, r"mode='both'; expected one of"),
        ({"momentum": 1.0}, r"momentum=1.0; expected 0 <= momentum < 1"),
        ({"momentum": -0.1}, r"momentum=-0.1; expected 0 <= momentum < 1"),
        ({"w_min": 0.0}, r"w_min=0.0, w_max=1.5; expected 0 < w_min <= 1 <= w_max"),
        ({"w_min": 1.2}, r"w_min=1.2, w_max=1.5; expected 0 < w_min <= 1 <= w_max"),
        ({"w_max": 0.9}, r"w_min=0.5, w_max=0.9; expected 0 < w_min <= 1 <= w_max"),
        ({"fixed_weights": (1.0, 0.0)}, r"fixed_weights=\(1.0, 0.0\); expected two positive"),
        ({"fixed_weights": (1.0,)}, r"fixed_weights=\(1.0,\); expected two positive"),
        ({"reference": 0.1}, r"reference=0.1 is used by mode='global' only"),
        ({"mode": "global", "reference": 0.0}, r"reference=0.0; expected > 0"),
        ({"eps": 0.0}, r"eps=0.0; expected > 0"),
    ],
)
def test_invalid_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        LossWeighting(**kwargs)


def test_missing_statistics_is_a_clear_error() -> None:
    callback = LossWeighting()
    with pytest.raises(ConfigurationError, match="needs the step's statistics"):
        callback.on_train_batch_end(None, StubModule(), {"loss": torch.tensor(1.0)}, None, 0)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- real fit
class Probe(L.Callback):
    """Per step: the controls after every callback wrote them, those the step used, its outputs."""

    def __init__(self) -> None:
        self.written: list[Controls] = []
        self.rows: list[tuple[Controls, StepStatistics, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.written.append(pl_module.controls)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append((outputs["controls"], outputs["statistics"], outputs["loss"]))


@pytest.mark.parametrize("mode", ["directions", "global"])
def test_weights_reach_the_loss_in_a_real_fit(
    tiny_text_model: str, tmp_path: Path, mode: str
) -> None:
    # Imported here: the distributed test's spawned ranks import this file and need none of it.
    from adaptalign.datamodules.datamodule import AlignmentDataModule
    from adaptalign.datamodules.generated import GeneratedConfig
    from tests.helpers.builders import quiet_trainer, tiny_module

    data = AlignmentDataModule(
        generated=GeneratedConfig(num_train=48, num_val=8, num_test=8, image_size=32),
        cache_dir=str(tmp_path),
        batch_size=8,
    )
    momentum, w_min, w_max, eps = 0.5, 0.2, 5.0, 1e-8
    callback = LossWeighting(
        signal="variance", mode=mode, momentum=momentum, w_min=w_min, w_max=w_max
    )  # type: ignore[arg-type]
    probe = Probe()
    trainer = quiet_trainer(
        max_epochs=1, limit_val_batches=0, log_every_n_steps=1, callbacks=[callback, probe]
    )
    trainer.fit(tiny_module(tiny_text_model), data)
    assert len(probe.rows) == 6  # 48 / 8 batches

    s = None
    first = None
    for t, (controls, statistics, loss) in enumerate(probe.rows):
        assert probe.written[t] is controls  # what the callback wrote is what the step consumed
        w = [float(v) for v in controls.direction_weights]
        scale = float(controls.loss_scale)
        if s is None:
            assert (w, scale) == ([1.0, 1.0], 1.0)
        elif mode == "directions":
            total = s[0] + s[1]
            expected = [min(max((2 * v + eps) / (total + eps), w_min), w_max) for v in s]
            assert w == pytest.approx(expected, rel=1e-5), t
            assert scale == 1.0
        else:
            mean = (s[0] + s[1]) / 2
            assert scale == pytest.approx(min(max(mean / first, w_min), w_max), rel=1e-5), t
            assert w == [1.0, 1.0]
        # The loss the step returned used these weights.
        by_hand = (
            scale
            * (w[0] * statistics.row_losses_i2t.mean() + w[1] * statistics.row_losses_t2i.mean())
            / 2
        )
        assert float(loss) == pytest.approx(float(by_hand), rel=1e-5), t
        x = [float(v) for v in statistics.positive_prob_var]
        s = (
            x
            if s is None
            else [momentum * a + (1 - momentum) * b for a, b in zip(s, x, strict=True)]
        )
        first = (s[0] + s[1]) / 2 if first is None else first
    assert callback.steps == 6
    logged = trainer.callback_metrics
    assert float(logged["loss_weight/signal_i2t"]) == pytest.approx(s[0], rel=1e-5)
    assert float(logged["loss_weight/variance_t2i"]) == pytest.approx(s[1], rel=1e-5)
    if mode == "directions":
        later = [[float(v) for v in c.direction_weights] for c, _, _ in probe.rows[1:]]
        assert all(abs(w[0] - 1.0) > 1e-4 for w in later)
        assert float(logged["loss_weight/w_t2i"]) == pytest.approx(later[-1][1], rel=1e-6)
    else:
        later = [float(c.loss_scale) for c, _, _ in probe.rows[2:]]
        assert all(abs(v - 1.0) > 1e-4 for v in later)
        assert float(logged["loss_weight/scale"]) == pytest.approx(later[-1], rel=1e-6)


def test_spread_as_direction_weights_is_warned_about() -> None:
    """The two directions' similarity matrices are transposes: equal spreads, weights (1, 1)."""
    from adaptalign.lightning_modules.losses import step_statistics

    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1)
    text = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1)
    sim = image @ text.T
    rows = torch.zeros(6)
    stats = step_statistics(sim, sim.T, torch.arange(6), 0.1, rows, rows)
    assert torch.allclose(stats.similarity_std[0], stats.similarity_std[1])
    with pytest.warns(UserWarning, match="use mode='global'"):
        LossWeighting(signal="spread", mode="directions")
