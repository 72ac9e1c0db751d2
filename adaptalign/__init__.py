"""adaptalign: data-efficient image-text alignment with adaptive contrastive training."""

__version__ = "0.1.0"
