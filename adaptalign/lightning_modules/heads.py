"""The trained head of each tower: a linear projection or a small MLP to the shared space.

With frozen towers the head is the only capacity the alignment has, so a 2-layer MLP
(``Linear -> GELU -> Linear``) is offered beside the linear map; the hidden width defaults to the
tower's feature width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from adaptalign.common.errors import ConfigurationError

HEADS = ("linear", "mlp")
HeadKind = Literal["linear", "mlp"]


@dataclass(frozen=True)
class HeadSpec:
    """Which head both towers get, and an MLP's hidden width (None: the feature width)."""

    kind: HeadKind = "linear"
    hidden: int | None = None

    def check(self) -> None:
        if self.kind not in HEADS:
            raise ConfigurationError(f"projection={self.kind!r}; expected one of {HEADS}")
        if self.hidden is not None and (not isinstance(self.hidden, int) or self.hidden < 1):
            raise ConfigurationError(
                f"projection_hidden={self.hidden!r}; expected an integer >= 1 or null"
            )
        if self.hidden is not None and self.kind == "linear":
            raise ConfigurationError(
                "projection_hidden is set but projection=linear has no hidden layer; "
                "set projection: mlp or leave projection_hidden out"
            )

    def build(self, in_dim: int, out_dim: int) -> nn.Module:
        if self.kind == "linear":
            return nn.Linear(in_dim, out_dim)
        hidden = self.hidden or in_dim
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


LINEAR = HeadSpec()
