"""The system: towers, losses, controls and retrieval metrics (knows nothing of the data side)."""

from adaptalign.common.lazy import lazy_exports

_WHERE = {
    "AlignmentModule": "adaptalign.lightning_modules.system",
    "Controls": "adaptalign.lightning_modules.controls",
    "RetrievalMetric": "adaptalign.lightning_modules.retrieval",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
