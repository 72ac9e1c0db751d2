"""ARL: asymmetric modality weighting by inverse prediction variance, with a bias term.

ARL strengthens the modality the system relies on less (one modality's weight grows with the
other's dependence), in proportion to how confident its own predictions are. Each step it needs one
auxiliary unimodal prediction per modality; it turns their statistics into two weights and adds a
bias term that trains those predictions.

Adaptation to contrastive alignment. ARL was written for classification, where each modality has a
classifier head. An alignment system has no labels and no heads, so the auxiliary prediction is
the pair's long-tail caption cluster, scored against cluster prototypes that cost no parameters:

    prototype_c  = normalise(EMA over steps of the mean L2-normalised text embedding of cluster c)
    logits_m     = emb_m @ prototypes.T / aux_temperature          m in (image, text)
    CE_m         = cross-entropy of logits_m against the pair's cluster
    H_m          = mean over rows of the softmax entropy of logits_m   (the variance proxy)
    d_m          = mean |logits_m|, normalised: d_m / (d_image + d_text)   (the dependence)
    s_m          = max(H_m / (H_image + H_text), floor)   (the entropy share, floored)
    q_m          = (1 / s_m) / (1 / s_image + 1 / s_text)   (the inverse-variance share)
    (w_image, w_text) = softmax(T * [d_text * q_image, d_image * q_text])
    loss        += b * (CE_image + CE_text)                      (the bias term, ``arl_bias``)

As in the reference implementation, ``floor`` (``entropy_share_floor``) is 0.3 and the bias
weight ``b`` is 1 during the warm-up epochs (``warmup_bias_weight``) and ``gamma`` after them.
The floor raises only the smaller share (the two sum to 1), so it keeps ``q`` within
[floor, 1] / (1 + floor), i.e. [0.231, 0.769]: raw shares (0.1, 0.9) become (0.3, 0.9), so
q = (0.75, 0.25) instead of (0.9, 0.1); shares of 0.3 or more are left alone. There the floor
acts on each batch's entropies; here on the smoothed ones, which the weights use. A floor of 0 (or
None) gives the plain inverse-entropy share; a ``warmup_bias_weight`` of None weights the bias term
by ``gamma`` throughout.

A step predicts against the prototypes of the steps before it; clusters not yet seen are masked
out of both predictions. The update runs after the step, in ``on_train_batch_end``, from detached
copies of the text rows and labels the bias term kept: every rank gathers all ranks' rows (rank
order) with plain collectives and applies the same update, outside any autograd graph (the first
observation of a cluster sets its prototype, later ones move it by ``1 - momentum``). ``H`` and
``d`` are reduced across ranks (sums over rows, then divided by the global row count) and smoothed
with the same momentum, so every rank computes the same weights. A step's weights come from the
statistics of the steps before it.

Applying the weights. The reference implementation computes the weights but never uses them; here
they are applied, as the gradient scale ``1 + w_m`` on tower ``m``'s embedding (identity forward),
so the alignment loss keeps its value while the under-used modality's tower receives the larger
share of the gradient. The scale sits on the embedding, so it multiplies the bias term's gradient
too. During the first ``warmup_epochs`` epochs the weights are equal, (0.5, 0.5), i.e. both towers
get the scale 1.5: the gradient size does not jump when the weights switch on, only its split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from adaptalign.callbacks.log_steps import writes_logs
from adaptalign.common.errors import ConfigurationError
from adaptalign.lightning_modules.controls import StepEmbeddings
from adaptalign.lightning_modules.gather import all_reduce_sum, distributed_world

_EPS = 1e-8
MISSING_CLUSTERS = "ARL needs caption clusters: set data.clusters"
ENTROPY_SHARE_FLOOR = 0.3  # the published implementation's floor on H_m / (H_image + H_text)


# --------------------------------------------------------------------------- pure math
def inverse_entropy_shares(
    entropy: Tensor, share_floor: float | None = ENTROPY_SHARE_FLOOR
) -> Tensor:
    """(q_image, q_text): each modality's inverse-entropy share, its entropy share floored first.

    The floor applies to ``H_m / (H_image + H_text)``, so no modality's entropy counts as less than
    ``share_floor`` of the total however confident its predictions. Raising the entropy itself to
    ``share_floor * (H_image + H_text)`` is the same, as ``q`` does not change when both entropies
    are scaled; a floor of 0 or None leaves the entropies, and the shares, exactly as they were.
    """
    entropy = entropy.clamp_min(_EPS)
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
    dep = dependence / dependence.sum().clamp_min(_EPS)
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
    zero = image.new_zeros(2)
    if rows == 0:
        # Keep the graph (a zero gradient) so the loss has the same inputs on every step.
        keep = (image.sum() + text.sum()) * 0.0
        return AuxiliaryTerms(torch.stack([keep, keep]), zero, zero.clone(), 0)
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


def _is_number(value: object) -> bool:
    """An int or float, not a bool (NaN passes here and fails the range checks)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _gather_rows(x: Tensor) -> Tensor:
    """All ranks' rows of ``x`` in rank order (ranks may hold different counts); no gradient."""
    _, world = distributed_world()
    if world == 1:
        return x
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(c) for c in counts]
    longest = max(sizes)
    padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


# ---------------------------------------------------------------------------- callback
class ARL(L.Callback):
    """Writes ARL's tower gradient scales and bias term into the system's controls every step.

    Args:
        gamma: weight of the bias term ``CE_image + CE_text`` in the loss after the warm-up.
        temperature: T, the sharpness of the softmax that turns the scores into weights.
        warmup_epochs: epochs with equal weights (0.5, 0.5) while prototypes and statistics settle.
        entropy_share_floor: floor on each modality's entropy share ``H_m / (H_image + H_text)``
            before the inverse-entropy shares ``q`` are taken: 0.3 as published, which keeps ``q``
            in [0.231, 0.769]; 0 or None for no floor. Values in [0, 0.5).
        warmup_bias_weight: weight of the bias term during the warm-up epochs: 1 as published
            (a fixed weight while the modality weights are equal); None for ``gamma`` throughout.
        momentum: EMA momentum of the prototypes and of the entropy/dependence statistics.
        aux_temperature: temperature of the auxiliary cluster predictions (logit scale 1/it).
        num_clusters: prototype count; default the data module's number of caption clusters.
    """

    def __init__(
        self,
        gamma: float = 4.0,
        temperature: float = 4.0,
        warmup_epochs: int = 5,
        momentum: float = 0.9,
        aux_temperature: float = 0.1,
        num_clusters: int | None = None,
        entropy_share_floor: float | None = ENTROPY_SHARE_FLOOR,
        warmup_bias_weight: float | None = 1.0,
    ) -> None:
        if gamma < 0:
            raise ConfigurationError(f"gamma={gamma!r}; expected >= 0")
        if temperature < 0:
            raise ConfigurationError(f"temperature={temperature!r}; expected >= 0")
        if (
            isinstance(warmup_epochs, bool)
            or not isinstance(warmup_epochs, int)
            or warmup_epochs < 0
        ):
            raise ConfigurationError(f"warmup_epochs={warmup_epochs!r}; expected an integer >= 0")
        if not 0 <= momentum < 1:
            raise ConfigurationError(f"momentum={momentum!r}; expected a value in [0, 1)")
        if aux_temperature <= 0:
            raise ConfigurationError(f"aux_temperature={aux_temperature!r}; expected > 0")
        if num_clusters is not None and (
            isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1
        ):
            raise ConfigurationError(
                f"num_clusters={num_clusters!r}; expected an integer >= 1 or null (from the data)"
            )
        if entropy_share_floor is not None and (
            not _is_number(entropy_share_floor) or not 0 <= entropy_share_floor < 0.5
        ):
            raise ConfigurationError(
                f"entropy_share_floor={entropy_share_floor!r}; expected a value in [0, 0.5) "
                "or null (no floor)"
            )
        if warmup_bias_weight is not None and (
            not _is_number(warmup_bias_weight) or not 0 <= warmup_bias_weight < math.inf
        ):
            raise ConfigurationError(
                f"warmup_bias_weight={warmup_bias_weight!r}; expected a finite value >= 0 "
                "or null (gamma during the warm-up too)"
            )
        self.gamma = gamma
        self.temperature = temperature
        self.warmup_epochs = warmup_epochs
        self.momentum = momentum
        self.aux_temperature = aux_temperature
        self.requested_clusters = num_clusters
        self.entropy_share_floor = entropy_share_floor
        self.warmup_bias_weight = warmup_bias_weight
        self.num_clusters = num_clusters
        self.prototypes: Tensor | None = None  # [num_clusters, dim], created at the first step
        self.seen: Tensor | None = None  # [num_clusters] bool
        self.entropy: Tensor | None = None  # smoothed (H_image, H_text)
        self.dependence: Tensor | None = None  # smoothed normalised (d_image, d_text)
        self.last_weights: Tensor | None = None  # (w_image, w_text) written for the current step
        self._pending: tuple[Tensor, Tensor, AuxiliaryTerms] | None = None

    # -------------------------------------------------------------------- weights
    def current_weights(self, epoch: int) -> Tensor:
        """(w_image, w_text) for a step of ``epoch``: equal in warm-up or before any statistics."""
        if epoch < self.warmup_epochs or self.entropy is None or self.dependence is None:
            return torch.tensor([0.5, 0.5])
        return arl_weights(
            self.entropy, self.dependence, self.temperature, self.entropy_share_floor
        )

    def bias_weight(self, epoch: int) -> float:
        """The bias term's weight for a step of ``epoch``: ``warmup_bias_weight`` in warm-up."""
        if epoch < self.warmup_epochs and self.warmup_bias_weight is not None:
            return self.warmup_bias_weight
        return self.gamma

    # ------------------------------------------------------------------- bias term
    def bias_loss(self, view: StepEmbeddings) -> Tensor:
        """``CE_image + CE_text`` of this rank's rows against the (fixed) prototypes.

        Gradients reach the embeddings only; the prototypes are plain tensors updated after the
        step. What the update and the statistics need is kept, detached, for ``on_train_batch_end``.
        """
        if "cluster" not in view.batch:
            raise ConfigurationError(MISSING_CLUSTERS)
        labels = view.batch["cluster"]
        self._ensure_prototypes(view.text.shape[1], view.text.device)
        terms = auxiliary_terms(
            view.image, view.text, labels, self.prototypes.detach(), self.seen, self.aux_temperature
        )
        self._pending = (view.text.detach(), labels.detach().long(), terms)
        return terms.cross_entropy.sum()

    def _ensure_prototypes(self, dim: int, device: torch.device) -> None:
        if self.num_clusters is None:
            raise ConfigurationError(
                "ARL.num_clusters is unknown: fit with a data module that has caption clusters "
                "(data.clusters) or set num_clusters"
            )
        if self.prototypes is None or self.seen is None:
            self.prototypes = torch.zeros(self.num_clusters, dim, device=device)
            self.seen = torch.zeros(self.num_clusters, dtype=torch.bool, device=device)
        elif self.prototypes.shape[1] != dim:
            raise ConfigurationError(
                f"ARL prototypes have dimension {self.prototypes.shape[1]} but the embeddings "
                f"have {dim}; expected the embed_dim the prototypes were built with"
            )
        self._to(device)

    def _to(self, device: torch.device) -> None:
        for name in ("prototypes", "seen", "entropy", "dependence"):
            value = getattr(self, name)
            if value is not None and value.device != torch.device(device):
                setattr(self, name, value.to(device))

    # ------------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        clusters = getattr(trainer.datamodule, "caption_clusters", None)
        if self.requested_clusters is None:
            if clusters is None:
                raise ConfigurationError(MISSING_CLUSTERS)
            self.num_clusters = len(clusters.sizes)
        else:
            self.num_clusters = self.requested_clusters
            if clusters is not None and len(clusters.sizes) > self.num_clusters:
                raise ConfigurationError(
                    f"num_clusters={self.num_clusters} but the data has {len(clusters.sizes)} "
                    "caption clusters; expected at least as many prototypes as clusters"
                )
        if self.prototypes is not None and self.prototypes.shape[0] != self.num_clusters:
            raise ConfigurationError(
                f"the restored ARL state has {self.prototypes.shape[0]} prototypes but the data "
                f"has {self.num_clusters} caption clusters; expected the clustering it was "
                "trained with"
            )
        self._to(pl_module.device)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int
    ) -> None:
        if "cluster" not in batch:
            raise ConfigurationError(MISSING_CLUSTERS)
        weights = self.current_weights(trainer.current_epoch)
        self.last_weights = weights.detach().cpu()
        w_image, w_text = (float(w) for w in self.last_weights)
        controls = pl_module.controls
        # Multiplied into what other callbacks wrote, so methods compose in any order.
        old = controls.tower_grad_scale
        controls.tower_grad_scale = (old[0] * (1.0 + w_image), old[1] * (1.0 + w_text))
        bias_weight = self.bias_weight(trainer.current_epoch)
        controls.add_extra_loss("arl_bias", bias_weight, self.bias_loss)
        self._pending = None
        if writes_logs(trainer):
            pl_module.log("arl/w_image", w_image, on_step=True)
            pl_module.log("arl/w_text", w_text, on_step=True)
            pl_module.log("arl/bias_weight", bias_weight, on_step=True)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: object,
        batch: dict,
        batch_idx: int,
    ) -> None:
        # Every rank joins the same collectives, whatever its own step produced.
        device = pl_module.device
        pending, self._pending = self._pending, None
        if pending is None:
            dim = 0 if self.prototypes is None else self.prototypes.shape[1]
            text = torch.zeros(0, dim, device=device)
            labels = torch.zeros(0, dtype=torch.long, device=device)
            local = torch.zeros(5, device=device)
        else:
            text, labels, terms = pending
            if writes_logs(trainer):
                bias = terms.cross_entropy.detach().sum()
                pl_module.log("arl/bias_loss", bias, on_step=True)
            local = torch.cat(
                [
                    terms.entropy_sum.float(),
                    terms.dependence_sum.float(),
                    torch.tensor([float(terms.rows)], device=terms.entropy_sum.device),
                ]
            ).to(device)
        reduced = all_reduce_sum(local)
        all_text = _gather_rows(text.float().to(device))
        all_labels = _gather_rows(labels.to(device))
        self.observe(reduced[:2], reduced[2:4], int(reduced[4]), all_text, all_labels)
        if self.entropy is not None and self.dependence is not None and writes_logs(trainer):
            pl_module.log("arl/entropy_image", float(self.entropy[0]), on_step=True)
            pl_module.log("arl/entropy_text", float(self.entropy[1]), on_step=True)
            pl_module.log("arl/dependence_image", float(self.dependence[0]), on_step=True)
            pl_module.log("arl/dependence_text", float(self.dependence[1]), on_step=True)

    def observe(
        self,
        entropy_sum: Tensor,
        dependence_sum: Tensor,
        rows: int,
        text: Tensor,
        labels: Tensor,
    ) -> None:
        """Fold one step's global statistics and text rows into the EMAs and the prototypes."""
        if rows > 0:
            entropy = entropy_sum / rows
            raw = dependence_sum / rows
            dependence = raw / raw.sum().clamp_min(_EPS)
            if self.entropy is None or self.dependence is None:
                self.entropy, self.dependence = entropy, dependence
            else:
                m = self.momentum
                self.entropy = m * self.entropy.to(entropy.device) + (1 - m) * entropy
                self.dependence = m * self.dependence.to(dependence.device) + (1 - m) * dependence
        if text.shape[0] > 0:
            self._ensure_prototypes(text.shape[1], text.device)
            self.prototypes, self.seen = update_prototypes(
                self.prototypes, self.seen, text, labels, self.momentum
            )

    # ----------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        def cpu(value: Tensor | None) -> Tensor | None:
            return None if value is None else value.detach().cpu().clone()

        return {
            "num_clusters": self.num_clusters,
            "prototypes": cpu(self.prototypes),
            "seen": cpu(self.seen),
            "entropy": cpu(self.entropy),
            "dependence": cpu(self.dependence),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if self.num_clusters is None:  # on_fit_start checks it against the data
            self.num_clusters = state_dict["num_clusters"]
        for name in ("prototypes", "seen", "entropy", "dependence"):
            value = state_dict[name]
            setattr(self, name, None if value is None else value.clone())
