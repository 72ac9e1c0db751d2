"""Figures drawn without pyplot's global state, and written as PNG whole or not at all."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from adaptalign.common.atomic_files import atomic_save

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(width: float, height: float, layout: str | None = None) -> Figure:
    """A figure with its own Agg canvas: safe in threads and on machines without a display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Figure, dpi: int = 100) -> bytes:
    """The drawn figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_png(figure: Figure, path: str | Path, dpi: int = 100) -> Path:
    """The figure written to ``path`` (parents created; a killed writer leaves the old file)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(out, png_bytes(figure, dpi))
    return out
