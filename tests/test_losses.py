"""Both criteria and the step statistics against hand computations on small similarity matrices."""

from __future__ import annotations

import math

import pytest
import torch

from adaptalign.lightning_modules.controls import scale_gradient
from adaptalign.lightning_modules.losses import info_nce, max_margin, step_statistics

# Image i against caption j; caption i against image j is the transpose (one process, B = N).
SIM2 = torch.tensor([[0.8, 0.2], [0.1, 0.5]])
TARGETS2 = torch.tensor([0, 1])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_info_nce_two_by_two_by_hand() -> None:
    # tau = 0.5: with two candidates, CE = log(1 + exp(-(s_pos - s_neg) / tau)).
    loss, row_i2t, row_t2i = info_nce(SIM2, SIM2.T, TARGETS2, 0.5)
    expected_i2t = [softplus(-1.2), softplus(-0.8)]  # (0.8-0.2)/0.5, (0.5-0.1)/0.5
    expected_t2i = [softplus(-1.4), softplus(-0.6)]  # (0.8-0.1)/0.5, (0.5-0.2)/0.5
    assert row_i2t.tolist() == pytest.approx(expected_i2t, abs=1e-6)
    assert row_t2i.tolist() == pytest.approx(expected_t2i, abs=1e-6)
    assert float(loss) == pytest.approx(sum(expected_i2t + expected_t2i) / 4, abs=1e-6)


def test_info_nce_per_sample_temperature_divides_each_row() -> None:
    tau = torch.tensor([0.5, 0.25])
    _, row_i2t, row_t2i = info_nce(SIM2, SIM2.T, TARGETS2, tau)
    # Row 1 now uses tau 0.25 in both directions: (0.5-0.1)/0.25 = 1.6, (0.5-0.2)/0.25 = 1.2.
    assert row_i2t.tolist() == pytest.approx([softplus(-1.2), softplus(-1.6)], abs=1e-6)
    assert row_t2i.tolist() == pytest.approx([softplus(-1.4), softplus(-1.2)], abs=1e-6)


def test_direction_weights_weigh_the_two_terms() -> None:
    _, row_i2t, row_t2i = info_nce(SIM2, SIM2.T, TARGETS2, 0.5)
    weighted, _, _ = info_nce(SIM2, SIM2.T, TARGETS2, 0.5, direction_weights=(1.5, 0.5))
    expected = (1.5 * row_i2t.mean() + 0.5 * row_t2i.mean()) / 2
    assert float(weighted) == pytest.approx(float(expected), abs=1e-7)


def test_local_rows_against_global_columns_use_offset_targets() -> None:
    """Rank 1 of 2 holds rows 2..3 of a 4x4 problem; its positives are columns 2 and 3."""
    sim = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    _, full_i2t, full_t2i = info_nce(sim, sim.T, torch.arange(4), 0.1)
    _, rows_i2t, rows_t2i = info_nce(sim[2:], sim.T[2:], torch.tensor([2, 3]), 0.1)
    assert torch.allclose(rows_i2t, full_i2t[2:]) and torch.allclose(rows_t2i, full_t2i[2:])


SIM3 = torch.tensor([[0.9, 0.5, 0.8], [0.3, 0.6, 0.7], [0.1, 0.2, 0.4]])


def test_max_margin_mean_negative_by_hand() -> None:
    # margin 0.2. Image rows: row0 hinges (0, 0.1) -> 0.05; row1 (0, 0.3) -> 0.15; row2 (0, 0) -> 0.
    # Caption rows (transpose): row0 (0, 0) -> 0; row1 (0.1, 0) -> 0.05; row2 (0.6, 0.5) -> 0.55.
    loss, row_i2t, row_t2i = max_margin(SIM3, SIM3.T, torch.arange(3), 0.2)
    assert row_i2t.tolist() == pytest.approx([0.05, 0.15, 0.0], abs=1e-6)
    assert row_t2i.tolist() == pytest.approx([0.0, 0.05, 0.55], abs=1e-6)
    assert float(loss) == pytest.approx((0.2 / 3 + 0.6 / 3) / 2, abs=1e-6)


def test_max_margin_hardest_negative_by_hand() -> None:
    loss, row_i2t, row_t2i = max_margin(SIM3, SIM3.T, torch.arange(3), 0.2, hardest=True)
    assert row_i2t.tolist() == pytest.approx([0.1, 0.3, 0.0], abs=1e-6)
    assert row_t2i.tolist() == pytest.approx([0.0, 0.1, 0.6], abs=1e-6)
    assert float(loss) == pytest.approx((0.4 / 3 + 0.7 / 3) / 2, abs=1e-6)


def test_max_margin_per_sample_margin() -> None:
    # Row 2 gets margin 0.5: image row2 hinges 0.5-0.4+0.1=0.2, 0.5-0.4+0.2=0.3 -> mean 0.25.
    margins = torch.tensor([0.2, 0.2, 0.5])
    _, row_i2t, _ = max_margin(SIM3, SIM3.T, torch.arange(3), margins)
    assert row_i2t.tolist() == pytest.approx([0.05, 0.15, 0.25], abs=1e-6)


def test_wrong_per_sample_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"temperature must be a scalar or have one value per row"):
        info_nce(SIM2, SIM2.T, TARGETS2, torch.tensor([0.1, 0.2, 0.3]))


def test_step_statistics_by_hand() -> None:
    _, row_i2t, row_t2i = info_nce(SIM2, SIM2.T, TARGETS2, 0.5)
    stats = step_statistics(SIM2, SIM2.T, TARGETS2, 0.5, row_i2t, row_t2i)

    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    def entropy(p: float) -> float:
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    p_i2t = [sigmoid(1.2), sigmoid(0.8)]
    p_t2i = [sigmoid(1.4), sigmoid(0.6)]
    for d, probs in enumerate((p_i2t, p_t2i)):
        mean = sum(probs) / 2
        assert float(stats.positive_prob_mean[d]) == pytest.approx(mean, abs=1e-6)
        var = sum((p - mean) ** 2 for p in probs) / 2
        assert float(stats.positive_prob_var[d]) == pytest.approx(var, abs=1e-6)
        assert float(stats.entropy[d]) == pytest.approx(
            sum(entropy(p) for p in probs) / 2, abs=1e-6
        )
    values = [0.8, 0.2, 0.1, 0.5]
    mean = sum(values) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    assert stats.similarity_std.tolist() == pytest.approx([std, std], abs=1e-6)
    assert stats.temperature.tolist() == pytest.approx([0.5, 0.5])
    assert stats.num_rows == 2


def test_scale_gradient_is_identity_forward_and_scales_backward() -> None:
    x = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    y = scale_gradient(x, 2.5)
    assert torch.equal(y, x)
    (y * torch.arange(12.0, dtype=torch.double).view(3, 4)).sum().backward()
    assert torch.allclose(x.grad, 2.5 * torch.arange(12.0, dtype=torch.double).view(3, 4))
    # gradcheck of the function times a factor equals the analytic Jacobian (scale * I)
    assert torch.autograd.gradcheck(
        lambda t: scale_gradient(t, torch.tensor(1.0)) * 3.0, (x.detach().requires_grad_(),)
    )
