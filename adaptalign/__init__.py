"""adaptalign: data-efficient image-text alignment with adaptive contrastive training.

The names below are the public API; each imports its module when first used.
"""

from adaptalign.common.lazy import lazy_exports

__version__ = "0.1.0"

_WHERE = {
    # the system and what it computes
    "AlignmentModule": "adaptalign.lightning_modules.system",
    "ImageTowerConfig": "adaptalign.lightning_modules.towers",
    "TextTowerConfig": "adaptalign.lightning_modules.towers",
    "Controls": "adaptalign.lightning_modules.controls",
    "RetrievalMetric": "adaptalign.lightning_modules.retrieval",
    # the data
    "AlignmentDataModule": "adaptalign.datamodules.datamodule",
    "GeneratedConfig": "adaptalign.datamodules.generated",
    "ClusterConfig": "adaptalign.datamodules.clusters",
    "NoiseConfig": "adaptalign.datamodules.noise",
    "OntologyConfig": "adaptalign.datamodules.ontology",
    "Record": "adaptalign.datamodules.records",
    # the adaptive methods and the other callbacks
    "TemperatureSchedule": "adaptalign.callbacks.temperature_schedule",
    "CosineTemperatureSchedule": "adaptalign.callbacks.temperature_schedule",
    "LossWeighting": "adaptalign.callbacks.loss_weighting",
    "ObjectCurriculum": "adaptalign.callbacks.curriculum",
    "ARL": "adaptalign.callbacks.arl",
    "TSNEView": "adaptalign.callbacks.tsne_view",
    "EmbeddingWriter": "adaptalign.callbacks.embedding_writer",
    "CollapseWatch": "adaptalign.callbacks.collapse_watch",
    "RunSummary": "adaptalign.callbacks.run_summary",
    "ModelInputsLink": "adaptalign.callbacks.model_inputs",
    # errors the command line reports in one line
    "ConfigurationError": "adaptalign.common.errors",
    "DatasetFormatError": "adaptalign.common.errors",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
