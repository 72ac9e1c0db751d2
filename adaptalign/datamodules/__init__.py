"""The data: formats, splits, captions clusters, tags, noise, features and loaders (no system)."""

from adaptalign.common.lazy import lazy_exports

_WHERE = {
    "AlignmentDataModule": "adaptalign.datamodules.datamodule",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
