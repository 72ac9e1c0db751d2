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
copies of the text rows and labels the bias term reported in the step's outputs (the term itself
only reads the prototypes, see :mod:`adaptalign.callbacks.arl_terms`): every rank gathers all
ranks' rows (rank order) with plain collectives and applies the same update, outside any
autograd graph (the first observation of a cluster sets its prototype, later ones move it by
``1 - momentum``). ``H`` and ``d`` are reduced across ranks (sums over rows, then divided by the
global row count) and smoothed with the same momentum, so every rank computes the same weights.
A step's weights come from the statistics of the steps before it.

Applying the weights. The reference implementation computes the weights but never uses them; here
they are applied, as the gradient scale ``1 + w_m`` on tower ``m``'s embedding (identity forward),
so the alignment loss keeps its value while the under-used modality's tower receives the larger
share of the gradient. The scale sits on the embedding, so it multiplies the bias term's gradient
too. During the first ``warmup_epochs`` epochs the weights are equal, (0.5, 0.5), i.e. both towers
get the scale 1.5: the gradient size does not jump when the weights switch on, only its split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import lightning as L
import torch
from torch import Tensor

from adaptalign.callbacks.arl_terms import (
    ENTROPY_SHARE_FLOOR,
    EPS,
    MISSING_CLUSTERS,
    BiasReport,
    BiasTerm,
    arl_weights,
    check_dimension,
    update_prototypes,
)
from adaptalign.callbacks.log_steps import still_writes, writes_logs
from adaptalign.common.checks import is_int, is_number
from adaptalign.common.errors import ConfigurationError
from adaptalign.lightning_modules.controls import ControlledSystem
from adaptalign.lightning_modules.gather import all_reduce_sum, gather_rows

BIAS = "arl_bias"  # the bias term's name among the step's extra losses and auxiliaries


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
        if num_clusters is not None and (not is_int(num_clusters) or num_clusters < 1):
            raise ConfigurationError(
                f"num_clusters={num_clusters!r}; expected an integer >= 1 or null (from the data)"
            )
        if entropy_share_floor is not None and (
            not is_number(entropy_share_floor) or not 0 <= entropy_share_floor < 0.5
        ):
            raise ConfigurationError(
                f"entropy_share_floor={entropy_share_floor!r}; expected a value in [0, 0.5) "
                "or null (no floor)"
            )
        if warmup_bias_weight is not None and (
            not is_number(warmup_bias_weight) or not 0 <= warmup_bias_weight < math.inf
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
        self._log_batch = True  # whether Lightning writes the current batch's logs

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
    def bias_term(self) -> BiasTerm:
        """The bias term of the next step, against the prototypes as they are now.

        The prototypes are updated after the step, from the :class:`BiasReport` the term returns
        in the step's outputs.
        """
        prototypes = None if self.prototypes is None else self.prototypes.detach()
        return BiasTerm(prototypes, self.seen, self.aux_temperature)

    def _ensure_prototypes(self, dim: int, device: torch.device) -> None:
        if self.num_clusters is None:
            raise ConfigurationError(
                "ARL.num_clusters is unknown: fit with a data module that has caption clusters "
                "(data.clusters) or set num_clusters"
            )
        if self.prototypes is None or self.seen is None:
            self.prototypes = torch.zeros(self.num_clusters, dim, device=device)
            self.seen = torch.zeros(self.num_clusters, dtype=torch.bool, device=device)
        else:
            check_dimension(self.prototypes, dim)
        self._to(device)

    def _to(self, device: torch.device) -> None:
        for name in ("prototypes", "seen", "entropy", "dependence"):
            value = getattr(self, name)
            if value is not None and value.device != torch.device(device):
                setattr(self, name, value.to(device))

    # ------------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: ControlledSystem) -> None:
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
        self, trainer: L.Trainer, pl_module: ControlledSystem, batch: dict, batch_idx: int
    ) -> None:
        if "cluster" not in batch:
            raise ConfigurationError(MISSING_CLUSTERS)
        self._to(pl_module.device)
        weights = self.current_weights(trainer.current_epoch)
        self.last_weights = weights.detach().cpu()
        w_image, w_text = (float(w) for w in self.last_weights)
        controls = pl_module.controls
        # Multiplied into what other callbacks wrote, so methods compose in any order.
        old = controls.tower_grad_scale
        controls.tower_grad_scale = (old[0] * (1.0 + w_image), old[1] * (1.0 + w_text))
        bias_weight = self.bias_weight(trainer.current_epoch)
        controls.add_extra_loss(BIAS, bias_weight, self.bias_term())
        self._log_batch = writes_logs(trainer)
        if self._log_batch:
            pl_module.log("arl/w_image", w_image, on_step=True)
            pl_module.log("arl/w_text", w_text, on_step=True)
            pl_module.log("arl/bias_weight", bias_weight, on_step=True)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: ControlledSystem,
        outputs: object,
        batch: dict,
        batch_idx: int,
    ) -> None:
        # Every rank joins the same collectives, whatever its own step produced.
        device = pl_module.device
        report = step_report(outputs)
        log = still_writes(trainer, self._log_batch)
        if report is None:
            dim = 0 if self.prototypes is None else self.prototypes.shape[1]
            text = torch.zeros(0, dim, device=device)
            labels = torch.zeros(0, dtype=torch.long, device=device)
            local = torch.zeros(5, device=device)
        else:
            text, labels = report.text, report.labels
            if log:
                pl_module.log("arl/bias_loss", report.loss, on_step=True)
            local = torch.cat(
                [
                    report.entropy_sum.float(),
                    report.dependence_sum.float(),
                    torch.tensor([float(report.rows)], device=report.entropy_sum.device),
                ]
            ).to(device)
        reduced = all_reduce_sum(local)
        all_text = gather_rows(text.float().to(device))
        all_labels = gather_rows(labels.to(device))
        self.observe(reduced[:2], reduced[2:4], int(reduced[4]), all_text, all_labels)
        if self.entropy is not None and self.dependence is not None and log:
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
            dependence = raw / raw.sum().clamp_min(EPS)
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


def step_report(outputs: object) -> BiasReport | None:
    """The bias term's report in a training step's outputs; ``None`` for a skipped step."""
    if outputs is None:
        return None
    auxiliaries = outputs.get("auxiliaries") if isinstance(outputs, Mapping) else None
    if not isinstance(auxiliaries, Mapping):
        raise ConfigurationError(
            "ARL needs the step's auxiliaries: training_step must return {'loss': ..., "
            "'auxiliaries': {name: ...}} with what each extra loss reported, as AlignmentModule "
            "does"
        )
    report = auxiliaries.get(BIAS)
    return report if isinstance(report, BiasReport) else None
