"""ARL's arithmetic: modality weights, cluster prototypes, and the bias term a step adds.

Pure functions of tensors, and :class:`BiasTerm`, the extra loss the callback hands the system for
one step (see :mod:`adaptalign.callbacks.arl` for the method and its adaptation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from adaptalign.common.errors import ConfigurationError
from adaptalign.lightning_modules.controls import LossTerm, StepEmbeddings

EPS = 1e-8  # keeps entropy shares and dependence ratios finite
MISSING_CLUSTERS = "ARL needs caption clusters: set data.clusters"
ENTROPY_SHARE_FLOOR = 0.3  # the published implementation's floor on H_m / (H_image + H_text)


def inverse_entropy_shares(
    entropy: Tensor, share_floor: float | None = ENTROPY_SHARE_FLOOR
) -> Tensor:
    """(q_image, q_text): each modality's inverse-entropy share, its entropy share floored first.

    The floor applies to ``H_m / (H_image + H_text)``, so no modality's entropy counts as less than
    ``share_floor`` of the total however confident its predictions. Raising the entropy itself to
    ``share_floor * (H_image + H_text)`` is the same, as ``q`` does not change when both entropies
    are scaled; a floor of 0 or None leaves the entropies, and the shares, exactly as they were.
    """
    entropy = entropy.clamp_min(EPS)
    if share_floor:
        entropy = torch.maximum(entropy, share_floor * entropy.sum())
    inverse = 1.0 / entropy
    return inverse / inverse.sum()


def arl_weights(
    entropy: Tensor,
    dependence: Tensor,
    temperature: float,
    share_floor: float | None = ENTROPY_SHARE_FLOOR,
) -> Tensor:
    """(w_image, w_text) from per-modality entropies and (raw or normalised) dependences.

    A modality whose predictions vary less (lower entropy) and that the other modality depends on
    more gets the larger weight; ``temperature`` sharpens the split (0 gives equal weights).
    ``share_floor`` is the floor on the entropy shares (see ``inverse_entropy_shares``).
    """
    if entropy.shape != (2,) or dependence.shape != (2,):
        raise ValueError(
            f"entropy and dependence must have shape (2,), got {tuple(entropy.shape)} and "
            f"{tuple(dependence.shape)}"
        )
    share = inverse_entropy_shares(entropy, share_floor)
    dep = dependence / dependence.sum().clamp_min(EPS)
    scores = torch.stack([dep[1] * share[0], dep[0] * share[1]])
    return torch.softmax(temperature * scores, dim=0)


def auxiliary_logits(
    embeddings: Tensor, prototypes: Tensor, seen: Tensor, aux_temperature: float
) -> Tensor:
    """Cluster logits ``emb @ prototypes.T / aux_temperature``; unseen clusters are ``-inf``.

    A zero prototype would score 0, a plausible logit; ``-inf`` takes it out of the softmax, so
    clusters are predicted only once they have a prototype.
    """
    logits = embeddings @ prototypes.to(embeddings.dtype).T / aux_temperature
    return logits.masked_fill(~seen.to(logits.device), float("-inf"))


@torch.no_grad()
def update_prototypes(
    prototypes: Tensor, seen: Tensor, embeddings: Tensor, labels: Tensor, momentum: float
) -> tuple[Tensor, Tensor]:
    """New (prototypes, seen): EMA of each present cluster's mean embedding, re-normalised.

    A cluster's first observation sets its prototype to its batch mean; afterwards the prototype
    moves by ``(1 - momentum)`` towards each batch mean. Absent clusters are left as they were.
    """
    embeddings = embeddings.detach().to(prototypes.dtype)
    labels = labels.to(prototypes.device).long()
    counts = torch.bincount(labels, minlength=prototypes.shape[0]).to(prototypes.dtype)
    sums = torch.zeros_like(prototypes).index_add_(0, labels, embeddings)
    present = counts > 0
    means = sums / counts.clamp_min(1).unsqueeze(1)
    blended = torch.where(seen.unsqueeze(1), momentum * prototypes + (1 - momentum) * means, means)
    updated = torch.where(present.unsqueeze(1), F.normalize(blended, dim=1), prototypes)
    return updated, seen | present


@dataclass
class AuxiliaryTerms:
    """One step's auxiliary predictions over the rows whose cluster has a prototype.

    ``cross_entropy`` (image, text) keeps the graph; the sums are detached, for reduction across
    ranks before they are divided by the global row count.
    """

    cross_entropy: Tensor
    entropy_sum: Tensor
    dependence_sum: Tensor
    rows: int


def _no_rows(image: Tensor, text: Tensor) -> AuxiliaryTerms:
    """No row's cluster has a prototype: zero terms that keep the graph (a zero gradient), so
    the loss has the same inputs on every step."""
    zero = image.new_zeros(2)
    keep = (image.sum() + text.sum()) * 0.0
    return AuxiliaryTerms(torch.stack([keep, keep]), zero, zero.clone(), 0)


def auxiliary_terms(
    image: Tensor,
    text: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    seen: Tensor,
    aux_temperature: float,
) -> AuxiliaryTerms:
    """Cross-entropies, entropy sums and mean-|logit| sums of both modalities' predictions."""
    seen = seen.to(image.device)
    labels = labels.to(image.device).long()
    valid = seen[labels]
    rows = int(valid.sum())
    if rows == 0:
        return _no_rows(image, text)
    targets = labels[valid]
    cross, entropy, dependence = [], [], []
    for emb in (image[valid], text[valid]):
        logits = auxiliary_logits(emb, prototypes, seen, aux_temperature)
        cross.append(F.cross_entropy(logits, targets))
        detached = logits.detach()
        probs = detached.softmax(dim=1)
        entropy.append(torch.special.entr(probs).sum(dim=1).sum())
        dependence.append(detached[:, seen].abs().mean(dim=1).sum())
    return AuxiliaryTerms(torch.stack(cross), torch.stack(entropy), torch.stack(dependence), rows)


def check_dimension(prototypes: Tensor, dim: int) -> None:
    """Prototypes restored from a checkpoint must have the embeddings' dimension."""
    if prototypes.shape[1] != dim:
        raise ConfigurationError(
            f"ARL prototypes have dimension {prototypes.shape[1]} but the embeddings "
            f"have {dim}; expected the embed_dim the prototypes were built with"
        )


@dataclass(frozen=True)
class BiasReport:
    """What one step's bias term saw, detached, for the update after the step: this rank's text
    rows and cluster labels, the entropy and dependence sums over its ``rows`` rows with a
    prototype, and the term's value ``CE_image + CE_text``."""

    text: Tensor
    labels: Tensor
    entropy_sum: Tensor
    dependence_sum: Tensor
    rows: int
    loss: Tensor


@dataclass(frozen=True)
class BiasTerm:
    """ARL's bias term for one step: ``CE_image + CE_text`` of this rank's rows against the
    prototypes as they were before the step (``None``: none yet, so the term is 0).

    Gradients reach the embeddings only; the prototypes are plain tensors. It reads and writes
    nothing else: what the update after the step needs comes back as the term's
    :class:`BiasReport`, in the step's outputs.
    """

    prototypes: Tensor | None
    seen: Tensor | None
    aux_temperature: float

    def __call__(self, view: StepEmbeddings) -> LossTerm:
        if "cluster" not in view.batch:
            raise ConfigurationError(MISSING_CLUSTERS)
        labels = view.batch["cluster"]
        if self.prototypes is None or self.seen is None:
            terms = _no_rows(view.image, view.text)
        else:
            check_dimension(self.prototypes, view.text.shape[1])
            terms = auxiliary_terms(
                view.image, view.text, labels, self.prototypes, self.seen, self.aux_temperature
            )
        report = BiasReport(
            text=view.text.detach(),
            labels=labels.detach().long(),
            entropy_sum=terms.entropy_sum,
            dependence_sum=terms.dependence_sum,
            rows=terms.rows,
            loss=terms.cross_entropy.detach().sum(),
        )
        return LossTerm(terms.cross_entropy.sum(), report)
