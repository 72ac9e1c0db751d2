"""Contrastive criteria on this rank's rows against all gathered columns ("local loss").

Every function takes the similarity rows this rank computes: ``sim_i2t[i, j]`` is the cosine
similarity of local image ``i`` to global caption ``j``; ``sim_t2i[i, j]`` of local caption ``i`` to
global image ``j``; ``targets[i]`` is the global column of row ``i``'s positive. Temperatures and
margins are a scalar or one value per row, which is how per-sample schedules (MM-TS) plug in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from adaptalign.lightning_modules.controls import Scalar, StepStatistics


def _per_row(value: Scalar, rows: int, like: Tensor, name: str) -> Tensor:
    """Broadcastable (rows, 1) column of a scalar or per-row value; refuses other shapes."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t.reshape(1, 1)
    if t.shape != (rows,):
        raise ValueError(
            f"{name} must be a scalar or have one value per row ({rows}), "
            f"got shape {tuple(t.shape)}"
        )
    return t.reshape(rows, 1)


def _combine(row_i2t: Tensor, row_t2i: Tensor, weights: tuple[Scalar, Scalar]) -> Tensor:
    """Weighted mean of the two directions; with weights (1, 1) the plain symmetric mean."""
    return (weights[0] * row_i2t.mean() + weights[1] * row_t2i.mean()) / 2


def info_nce(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    targets: Tensor,
    temperature: Scalar,
    direction_weights: tuple[Scalar, Scalar] = (1.0, 1.0),
) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric InfoNCE; row ``i`` of both logit matrices is divided by ``tau_i``.

    Returns the loss and the per-row cross-entropies of each direction.
    """
    tau = _per_row(temperature, sim_i2t.shape[0], sim_i2t, "temperature")
    row_i2t = F.cross_entropy(sim_i2t / tau, targets, reduction="none")
    row_t2i = F.cross_entropy(sim_t2i / tau, targets, reduction="none")
    return _combine(row_i2t, row_t2i, direction_weights), row_i2t, row_t2i


def _hinge_rows(sim: Tensor, targets: Tensor, margin: Tensor, hardest: bool) -> Tensor:
    """Per-row hinge ``relu(m_i - s_i,pos + s_ij)`` over negatives: mean, or max (VSE++)."""
    positive = sim.gather(1, targets[:, None])
    hinge = (margin - positive + sim).clamp_min(0)
    is_negative = torch.ones_like(sim, dtype=torch.bool).scatter_(1, targets[:, None], False)
    hinge = hinge.masked_fill(~is_negative, 0.0)
    if hardest:
        return hinge.max(dim=1).values
    return hinge.sum(dim=1) / is_negative.sum(dim=1).clamp_min(1)


def max_margin(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    targets: Tensor,
    margin: Scalar,
    hardest: bool = False,
    direction_weights: tuple[Scalar, Scalar] = (1.0, 1.0),
) -> tuple[Tensor, Tensor, Tensor]:
    """Bidirectional max-margin ranking loss, mean over negatives or hardest negative (VSE++)."""
    m = _per_row(margin, sim_i2t.shape[0], sim_i2t, "margin")
    row_i2t = _hinge_rows(sim_i2t, targets, m, hardest)
    row_t2i = _hinge_rows(sim_t2i, targets, m, hardest)
    return _combine(row_i2t, row_t2i, direction_weights), row_i2t, row_t2i


@torch.no_grad()
def step_statistics(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    targets: Tensor,
    temperature: Scalar,
    row_i2t: Tensor,
    row_t2i: Tensor,
) -> StepStatistics:
    """The uncertainty signals adaptive callbacks feed on, from the temperature-scaled rows."""
    tau = _per_row(temperature, sim_i2t.shape[0], sim_i2t, "temperature")
    entropy, p_mean, p_var, spread = [], [], [], []
    for sim in (sim_i2t, sim_t2i):
        log_p = torch.log_softmax(sim.float() / tau, dim=1)
        entropy.append(-(log_p.exp() * log_p).sum(dim=1).mean())
        p_pos = log_p.gather(1, targets[:, None]).exp().squeeze(1)
        p_mean.append(p_pos.mean())
        p_var.append(p_pos.var(unbiased=False))
        spread.append(sim.float().std(unbiased=False))
    return StepStatistics(
        entropy=torch.stack(entropy),
        positive_prob_mean=torch.stack(p_mean),
        positive_prob_var=torch.stack(p_var),
        similarity_std=torch.stack(spread),
        row_losses_i2t=row_i2t.detach(),
        row_losses_t2i=row_t2i.detach(),
        temperature=tau.detach().squeeze(1).expand(sim_i2t.shape[0]).clone(),
    )
