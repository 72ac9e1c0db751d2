"""The two towers: any timm image model and any sentence-transformers / Hugging Face text model.

Each tower splits into a backbone (``features``) and a ``projection`` head to the shared space, so
a frozen backbone's features can be cached and only the head trained, and so the optimiser can give
backbones and heads different learning rates.

Between frozen and fully trained, a tower can train only its top: the last blocks of a timm model
(``unlocked_blocks``, by timm's own grouping of its layers) or the last transformer layers of a
text model (``unlocked_layers``). The frozen prefix below then runs in eval mode without autograd,
and its output can be cached like a frozen tower's features (``from_cached``), so a training step
runs only the top and the head.
"""

from __future__ import annotations

import difflib
import logging
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import timm
import torch
from timm.data import create_transform, resolve_data_config
from torch import Tensor, nn

from adaptalign.common.errors import ConfigurationError
from adaptalign.common.hub import hub_unreachable
from adaptalign.encoders.length_sorted import encode_by_length, padded_by_length
from adaptalign.encoders.text_models import DEFAULT_MAX_TOKENS, load_text_model, sentence_width
from adaptalign.encoders.text_split import TextSplit, text_parameter_depths
from adaptalign.lightning_modules.heads import LINEAR, HeadSpec
from adaptalign.lightning_modules.image_split import (
    ImageSplit,
    image_parameter_depths,
    split_image_model,
)

log = logging.getLogger(__name__)

DECAY_SETTING = "model.tower_lr_decay"
# The files timm reads from a hub repository, in its order, when the model names none.
TIMM_WEIGHT_NAMES = ["model.safetensors", "pytorch_model.bin"]


@dataclass
class ImageTowerConfig:
    """Which timm model, where its weights come from, and how its input is prepared.

    ``image_size`` overrides the model's native input size (small generated images need not be
    upsampled to 224 px); preprocessing otherwise follows timm's data config for the model.

    ``unlocked_blocks``: how many of the model's top blocks train (timm's coarse grouping: the
    stages of a CNN, the blocks of a ViT; the final norm / head layers train with them); ``0`` is
    ``freeze: true``, ``"all"`` trains everything. Unset, ``freeze`` decides.

    ``augment``: timm's training augmentation for the model (random resized crop, flip, colour
    jitter) on training images. Augmented images differ every epoch, so a frozen part's output
    cannot be cached for them: training then recomputes it at every step (evaluation still reads
    the cache).
    """

    model_name: str = "resnet18"
    pretrained: bool = False
    checkpoint_path: str | None = None
    freeze: bool = False
    unlocked_blocks: int | Literal["all"] | None = None
    augment: bool = False
    image_size: int | None = None
    model_kwargs: dict = field(default_factory=dict)


@dataclass
class TextTowerConfig:
    """Which text model (hub name or local folder), whether it trains, and the token budget.

    ``chunk_size`` captions go through the backbone at a time, sorted by length first, so each
    forward pads to a length near its own captions' instead of the batch's longest. On CPU this
    makes a fine-tuned MiniLM's training step and its evaluation about twice as fast on Flickr8k
    captions (``benchmarks/bench_text_chunks.py``); ``None`` encodes a whole batch in one forward
    (for large GPUs).

    ``unlocked_layers``: how many of the top transformer layers train (with the pooling and
    anything after the layer stack); ``0`` is ``freeze: true``, ``"all"`` trains everything.
    Unset, ``freeze`` decides.
    """

    model_name: str = "all-MiniLM-L6-v2"
    freeze: bool = False
    unlocked_layers: int | Literal["all"] | None = None
    max_length: int = DEFAULT_MAX_TOKENS
    chunk_size: int | None = 32


def tower_config(value: object, cls: type, name: str) -> object:
    """A tower's settings from ``cls``, a mapping (as a config file gives them) or None."""
    if value is None:
        return cls()
    if isinstance(value, dict):
        try:
            return cls(**value)
        except TypeError as exc:
            raise ConfigurationError(f"{name}: {exc}") from exc
    if not isinstance(value, cls):
        raise ConfigurationError(f"{name} must be a {cls.__name__} or a mapping, got {value!r}")
    return value


def unlocked_count(value: object, freeze: bool, setting: str, tower: str) -> int | None:
    """How many top blocks / layers train: ``None`` for all of them, ``0`` for none.

    ``freeze`` decides when ``value`` is unset; set together, they must agree.
    """
    if value is None:
        return 0 if freeze else None
    if value == "all":
        count = None
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        count = value
    else:
        raise ConfigurationError(f'{setting}={value!r}; expected an integer >= 0 or "all"')
    if freeze and count != 0:
        raise ConfigurationError(
            f"{setting}={value!r} trains part of the tower, but {tower}.freeze=true freezes it; "
            f"leave freeze out (or set {setting}: 0)"
        )
    return count


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


def _lock_all_but(module: nn.Module, unlocked: frozenset[str]) -> None:
    for name, p in module.named_parameters():
        p.requires_grad_(name in unlocked)


class _Tower(nn.Module):
    """Shared behaviour: a frozen backbone, or a split tower's frozen prefix, stays in eval mode
    and is run without autograd."""

    backbone: nn.Module
    frozen: bool
    split: ImageSplit | TextSplit | None

    def train(self, mode: bool = True) -> _Tower:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        elif self.split is not None:
            for name in self.split.frozen_modules:
                self.backbone.get_submodule(name).eval()
        return self

    def backbone_parameter_depths(self, decayed: bool) -> list[tuple[nn.Parameter, int]]:
        """The trained backbone parameters with their depth below the tower's top; all 0 unless
        ``decayed``: only a learning rate that decays with depth needs the depths, which a model
        without blocks or layers to count does not have."""
        trained = [(name, p) for name, p in self.backbone.named_parameters() if p.requires_grad]
        if not decayed or not trained:
            return [(p, 0) for _, p in trained]
        depths = self._parameter_depths(DECAY_SETTING)
        return [(p, depths.get(name, 0)) for name, p in trained]

    def _parameter_depths(self, setting: str) -> dict[str, int]:
        """Each backbone parameter's depth below the top, from the tower's own grouping."""
        raise NotImplementedError("each tower counts its own blocks or layers")

    @property
    def cut(self) -> str:
        """Where the trained top starts; empty when the whole backbone is frozen."""
        return self.split.boundary if self.split is not None else ""

    def frozen_state(self) -> dict[str, Tensor]:
        """The weights and buffers a cached output of the frozen part depends on."""
        state = self.backbone.state_dict()
        if self.split is None:
            return state
        return {k: v for k, v in state.items() if k in self.split.prefix_state_names}

    def _head_input(self, rows: Tensor) -> Tensor:
        """Cached rows (stored in half precision) in the head's precision and device."""
        weight = next(self.projection.parameters())
        return rows.to(device=weight.device, dtype=weight.dtype)


def _unknown_timm_model(name: str) -> ConfigurationError:
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean one of {close}?" if close else " See timm.list_models()."
    return ConfigurationError(f"model.image_tower.model_name={name!r} is not a timm model.{hint}")


STATE_DICT = "a state dict (a mapping of parameter names to tensors)"
WEIGHT_FILES = "a torch file (.pth/.pt/.bin, from torch.save(model.state_dict())) or .safetensors"


def _describe_unreadable(file: Path, exc: Exception) -> str:
    """What a file that torch / safetensors could not load is, from its first bytes."""
    with file.open("rb") as handle:
        head = handle.read(64)
    if not head:
        return "an empty file"
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if unsupported:
        return (
            f"a torch file holding pickled objects such as {unsupported.group(1)}, not only "
            "tensors (save model.state_dict(), not the model)"
        )
    if file.suffix == ".safetensors":
        return f"not a valid safetensors file ({exc})"
    if head.startswith(b"PK"):
        with zipfile.ZipFile(file) as archive:
            if any(n.endswith("data.pkl") for n in archive.namelist()):
                return f"a torch file that does not load ({str(exc).splitlines()[0]})"
        return "a zip archive, not a torch file"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy array file, not a torch file"
    if head.startswith(b"\x80"):
        return "a pickle that is not a torch file of tensors"
    text = head.decode("utf-8", errors="replace")
    if "\ufffd" in text[:-1] or any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        return "binary data that is neither a torch nor a safetensors file"
    return f"a text file starting {text.splitlines()[0][:40]!r}, not a torch file"


def _read_state_dict(file: Path, setting: str) -> dict:
    """The file's state dict, unwrapped from a training checkpoint; what it holds when it is not."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigurationError(
            f"{setting}: expected {WEIGHT_FILES} holding {STATE_DICT}; "
            f"found {_describe_unreadable(file, exc)}"
        ) from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigurationError(
            f"{setting}: expected {STATE_DICT}; found a {type(state).__name__}"
        )
    if not state:
        raise ConfigurationError(f"{setting}: expected {STATE_DICT}; found an empty mapping")
    odd = [(k, v) for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if odd:
        key, value = odd[0]
        raise ConfigurationError(
            f"{setting}: expected {STATE_DICT}; found a mapping whose values are not all "
            f"tensors ({key!r}: {type(value).__name__}; keys {list(state)[:5]})"
        )
    return state


def _load_image_checkpoint(model: nn.Module, path: str) -> None:
    """Load a state dict from a local file into a headless timm model, dropping the classifier."""
    file = Path(path).expanduser()
    setting = f"model.image_tower.checkpoint_path={path!r}"
    if not file.is_file():
        raise ConfigurationError(f"{setting} does not exist; expected {WEIGHT_FILES}")
    state = _read_state_dict(file, setting)
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or "classifier"
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {
        k: v for k, v in state.items() if not k.startswith(tuple(c + "." for c in classifiers))
    }
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ConfigurationError(
            f"{setting} does not match the model's parameter shapes: {str(exc).splitlines()[1:3]}"
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        raise ConfigurationError(
            f"{setting} does not match the model: "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]})"
        )


def _cached_timm_weights(model_name: str) -> str | None:
    """The local hub cache's copy of the model's pretrained weights, if it holds one."""
    from huggingface_hub import try_to_load_from_cache

    pretrained = timm.models.get_pretrained_cfg(model_name)
    if pretrained is None or not pretrained.hf_hub_id:
        return None
    repo, _, revision = pretrained.hf_hub_id.partition("@")
    names = [pretrained.hf_hub_filename] if pretrained.hf_hub_filename else TIMM_WEIGHT_NAMES
    for name in names:
        found = try_to_load_from_cache(repo, name, revision=revision or None)
        if isinstance(found, str):
            return found
    return None


def _offline_weights(model_name: str) -> dict | None:
    """With no hub, timm's pretrained weights from the local cache, or a ConfigurationError now.

    ``None`` (the hub answers) lets timm download as usual.
    """
    offline = hub_unreachable()
    if offline is None:
        return None
    cached = _cached_timm_weights(model_name)
    if cached is None:
        raise ConfigurationError(
            f"model.image_tower.pretrained=true: no hub is reachable ({offline}) and the local "
            f"hub cache has no weights for {model_name!r}; give them as "
            "model.image_tower.checkpoint_path"
        )
    log.info(
        "no hub reachable (%s); %s weights from the local cache %s", offline, model_name, cached
    )
    return {"file": cached, "source": ""}


class ImageTower(_Tower):
    """A timm backbone without its classifier, and a projection to ``embed_dim``."""

    def __init__(self, config: ImageTowerConfig, embed_dim: int, head: HeadSpec = LINEAR) -> None:
        super().__init__()
        self.config = config
        if not timm.is_model(config.model_name):
            raise _unknown_timm_model(config.model_name)
        hub = config.pretrained and config.checkpoint_path is None
        overlay = _offline_weights(config.model_name) if hub else None
        try:
            self.backbone = timm.create_model(
                config.model_name,
                pretrained=hub,
                pretrained_cfg_overlay=overlay,
                num_classes=0,
                **config.model_kwargs,
            )
        except Exception as exc:
            what = "download its pretrained weights" if hub else "build it"
            raise ConfigurationError(
                f"model.image_tower.model_name={config.model_name!r}: could not {what} ({exc}). "
                "Without a hub, give the weights as model.image_tower.checkpoint_path."
            ) from exc
        if config.checkpoint_path is not None:
            _load_image_checkpoint(self.backbone, config.checkpoint_path)
        overrides: dict = {}
        if config.image_size is not None:
            if config.image_size < 8:
                raise ConfigurationError(
                    f"model.image_tower.image_size={config.image_size} is too small; "
                    "expected >= 8 px"
                )
            overrides = {"input_size": (3, config.image_size, config.image_size), "crop_pct": 1.0}
        self.data_config = resolve_data_config(overrides, model=self.backbone)
        unlocked = unlocked_count(
            config.unlocked_blocks,
            config.freeze,
            "model.image_tower.unlocked_blocks",
            "model.image_tower",
        )
        self.frozen = unlocked == 0
        self.split: ImageSplit | None = None
        if self.frozen:
            _freeze(self.backbone)
        else:
            if unlocked is not None:
                self.split = split_image_model(
                    self.backbone, config.model_name, unlocked, self.data_config["input_size"]
                )
                _lock_all_but(self.backbone, self.split.unlocked_parameters)
            self.train()
        self.feature_dim = int(self.backbone.num_features)
        self.projection = head.build(self.feature_dim, embed_dim)

    def _parameter_depths(self, setting: str) -> dict[str, int]:
        return image_parameter_depths(self.backbone, self.config.model_name, setting)

    @property
    def weights_source(self) -> str | None:
        """The setting the backbone's weights are loaded from; None when drawn at random."""
        if self.config.checkpoint_path is not None:
            return f"model.image_tower.checkpoint_path={self.config.checkpoint_path!r}"
        if self.config.pretrained:
            return f"model.image_tower.model_name={self.config.model_name!r} (pretrained)"
        return None

    def transform(self, training: bool = False) -> Callable:
        """timm's preprocessing for this model; random augmentation only for training images
        when ``augment`` asks for it."""
        return create_transform(**self.data_config, is_training=training and self.config.augment)

    @property
    def cached_shape(self) -> tuple[int, ...]:
        """One image's cached row: the features ``(D,)``, or a split tower's prefix map."""
        return (self.feature_dim,) if self.split is None else self.split.prefix_shape

    def frozen_features(self, images: Tensor) -> Tensor:
        """The frozen part's output: the whole backbone's features or the prefix's feature map."""
        with torch.no_grad():
            if self.split is None:
                return self.backbone(images)
            return self.split.prefix(self.backbone, images)

    def features(self, images: Tensor) -> Tensor:
        """Backbone features of raw images; a split tower recomputes its frozen prefix."""
        if self.frozen or self.split is not None:
            return self.top(self.frozen_features(images))
        return self.backbone(images)

    def top(self, rows: Tensor) -> Tensor:
        """Features from the frozen part's output: the trained blocks of a split tower."""
        return rows if self.split is None else self.split.suffix(self.backbone, rows)

    def from_cached(self, rows: Tensor) -> Tensor:
        """Embeddings from cached rows of the frozen part (features or prefix maps)."""
        return self.projection(self.top(self._head_input(rows)))

    def forward(self, images: Tensor) -> Tensor:
        return self.projection(self.features(images))


class TextTower(_Tower):
    """A sentence-transformers encoder (tokenises raw captions itself) and a projection."""

    def __init__(self, config: TextTowerConfig, embed_dim: int, head: HeadSpec = LINEAR) -> None:
        super().__init__()
        if config.max_length < 1:
            raise ConfigurationError(
                f"model.text_tower.max_length={config.max_length}; expected a positive token count"
            )
        if config.chunk_size is not None and config.chunk_size < 1:
            raise ConfigurationError(
                f"model.text_tower.chunk_size={config.chunk_size}; expected a positive caption "
                "count or null (one forward per batch)"
            )
        self.config = config
        self.backbone = load_text_model(config.model_name, config.max_length)
        unlocked = unlocked_count(
            config.unlocked_layers,
            config.freeze,
            "model.text_tower.unlocked_layers",
            "model.text_tower",
        )
        self.frozen = unlocked == 0
        self.split: TextSplit | None = None
        if self.frozen:
            _freeze(self.backbone)
        else:
            if unlocked is not None:
                self.split = TextSplit(self.backbone, unlocked, name=config.model_name)
                _lock_all_but(self.backbone, self.split.unlocked_parameters)
            self._freeze_unused()
            # Loaded models come in eval mode and Lightning keeps each module's mode as built:
            # a tower that trains must train with its dropout on (a frozen prefix stays in eval).
            self.train()
        self.feature_dim = sentence_width(self.backbone)
        self.projection = head.build(self.feature_dim, embed_dim)
        # A frozen encoder maps a caption to the same features every epoch: remember them.
        self._memo: dict[str, Tensor] = {}

    def _parameter_depths(self, setting: str) -> dict[str, int]:
        return text_parameter_depths(self.backbone, setting)

    @property
    def weights_source(self) -> str:
        """The setting the backbone's weights are loaded from (a model folder or a hub name)."""
        return f"model.text_tower.model_name={self.config.model_name!r}"

    def _freeze_unused(self) -> None:
        """Stop training weights the sentence embedding never reaches (e.g. BERT's pooler).

        They would get no gradient, which DDP refuses; one probe backward finds them for any model.
        """
        self.backbone(self._tokenize(["a"]))["sentence_embedding"].sum().backward()
        unused = [n for n, p in self.backbone.named_parameters() if p.grad is None]
        for name, p in self.backbone.named_parameters():
            p.grad = None
            if name in unused:
                p.requires_grad_(False)
        if unused:
            log.info("text tower: %d tensors never reach the embedding, kept fixed", len(unused))

    def _tokenize(self, texts: list[str]) -> dict:
        tokenize = getattr(self.backbone, "preprocess", None) or self.backbone.tokenize
        return tokenize(texts)

    def encode(self, texts: list[str]) -> Tensor:
        """The backbone on raw captions, never remembered (the feature cache stores its own).

        ``chunk_size`` captions at a time, sorted by length (:func:`encode_by_length`).
        """
        size = self.config.chunk_size
        if size is None or len(texts) <= size:
            return self._encode_chunk(texts)
        return encode_by_length(texts, size, self._encode_chunk)

    def _tokens(self, texts: list[str]) -> dict:
        tokens = self._tokenize(texts)
        device = next(self.projection.parameters()).device
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in tokens.items()}

    def _encode_chunk(self, texts: list[str]) -> Tensor:
        if self.split is not None:
            return self.split.suffix(*self.frozen_hidden(texts))
        return self.backbone(self._tokens(texts))["sentence_embedding"]

    @property
    def model(self) -> nn.Module:
        """The sentence-transformers model (its tokenizer and token budget)."""
        return self.backbone

    @property
    def hidden_size(self) -> int:
        if self.split is None:
            raise ValueError("only a split text tower has a frozen prefix")
        return self.split.hidden_size

    def frozen_hidden(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """The frozen prefix's hidden states ``(B, T, H)`` and attention mask of raw captions."""
        if self.split is None:
            raise ValueError("only a split text tower has a frozen prefix")
        with torch.no_grad():
            return self.split.prefix(self._tokens(texts))

    def from_cached(self, rows: Tensor, mask: Tensor | None = None) -> Tensor:
        """Embeddings from cached rows: sentence embeddings ``(B, D)``, or a split tower's
        padded prefix hidden states ``(B, T, H)`` with their attention ``mask``."""
        rows = self._head_input(rows)
        if mask is not None:
            if self.split is None:
                raise ValueError("prefix hidden states reach only a split text tower")
            mask = mask.to(rows.device)
            size = self.config.chunk_size
            if size is None or rows.shape[0] <= size:
                rows = self.split.suffix(rows, mask)
            else:
                rows = padded_by_length(rows, mask, size, self.split.suffix)
        return self.projection(rows)

    def features(self, texts: Sequence[str]) -> Tensor:
        texts = list(texts)
        if not self.frozen:
            return self.encode(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            with torch.no_grad():
                self._memo.update(zip(missing, self.encode(missing), strict=True))
        return torch.stack([self._memo[t] for t in texts]).to(
            next(self.projection.parameters()).device
        )

    def forward(self, texts: Sequence[str]) -> Tensor:
        return self.projection(self.features(texts))
