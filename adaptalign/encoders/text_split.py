"""Cutting a text model into a frozen prefix and a trained suffix of its last transformer layers.

With ``model.text_tower.unlocked_layers: N`` only the last N layers of the text model (and the
sentence-transformers modules after it: pooling, dense, normalise) train. What enters the first
unlocked layer then never changes, so the data side can cache it on disk and a training step runs
the suffix alone. :class:`TextSplit` finds the layer stack, runs the two halves, and checks at
construction that the halves together give what the whole model gives, so a model whose layers
need more than hidden states and an additive mask is refused up front instead of training wrong.
"""

from __future__ import annotations

import torch
from sentence_transformers import SentenceTransformer
from torch import Tensor, nn

from adaptalign.common.errors import ConfigurationError

SETTING = "model.text_tower.unlocked_layers"
# Two captions of different token lengths, so the check covers a padded row too.
PROBE_CAPTIONS = ("a red circle", "a small red circle next to a large blue square on the left")
PROBE_ATOL = 1e-5
PROBE_RTOL = 1e-4


class _PrefixDone(Exception):
    """Raised from the first unlocked layer's pre-hook: the prefix has what it needs."""


def layer_stack(hf_model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's list of transformer layers: a ModuleList as long as ``num_hidden_layers``.

    ``encoder.layer`` (BERT, RoBERTa, MPNet) and ``layers`` (most others) are preferred when
    several lists have that length, e.g. per-layer norms next to the layers.
    """
    count = getattr(getattr(hf_model, "config", None), "num_hidden_layers", None)
    if not isinstance(count, int) or count < 1:
        return None
    lists = [
        (name, module)
        for name, module in hf_model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count
    ]
    lists.sort(key=lambda item: item[0].rsplit(".", 1)[-1] not in ("layer", "layers"))
    return lists[0] if lists else None


def text_parameter_depths(model: nn.Module, setting: str) -> dict[str, int]:
    """Each parameter's depth below the top, for a learning rate that decays with depth.

    Transformer layer i of L (from 0) is at depth L - i; what the model registers before its
    layers (the embeddings, T5's shared table) or names ``embed`` (DeBERTa's relative embeddings)
    sits below the first layer, at L + 1; everything else (pooling, final norms, dense layers
    after the transformer) is the top, at 0. ``setting`` names the option that asked, for the
    error on a model without a list of layers.
    """
    children = list(model.children())
    hf_model = getattr(children[0], "auto_model", None) if children else None
    found = layer_stack(hf_model) if hf_model is not None else None
    if found is None:
        raise ConfigurationError(
            f"{setting}: the text model has no list of transformer layers, so its parameters "
            "have no depth to decay the learning rate by; use 1 (no decay)"
        )
    _, stack = found
    depth_of = {id(p): len(stack) - i for i, layer in enumerate(stack) for p in layer.parameters()}
    below = len(stack) + 1
    for p in hf_model.parameters():  # in the order the model registers them
        if id(p) in depth_of:
            break
        depth_of[id(p)] = below
    return {
        name: depth_of.get(id(p), below if "embed" in name else 0)
        for name, p in model.named_parameters()
    }


def _additive_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, T) 1/0 mask -> (B, 1, 1, T) with 0 where attended and the dtype's minimum at padding.

    The format encoder layers add to their attention scores; transformers 4.x built it with
    ``get_extended_attention_mask``, which 5.x no longer has.
    """
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


class TextSplit:
    """The last ``unlocked_layers`` layers of ``model`` as a suffix over a cacheable prefix.

    ``prefix(tokens)`` gives the hidden states entering the first unlocked layer and the attention
    mask; ``suffix(hidden, mask)`` runs the unlocked layers and the modules after the transformer
    and gives the sentence embedding ``model(tokens)["sentence_embedding"]`` gives.
    """

    layer_count: int
    unlocked_layers: int
    hidden_size: int
    boundary: str
    unlocked_parameters: frozenset[str]
    frozen_modules: tuple[str, ...]
    prefix_state_names: frozenset[str]

    def __init__(
        self, model: SentenceTransformer, unlocked_layers: int, name: str | None = None
    ) -> None:
        """Find the cut and check it on two probe captions; ConfigurationError if it cannot hold.

        ``name`` is what the user wrote for the model, so errors name it (default: the
        transformers config's ``name_or_path``).
        """
        self.model = model
        children = list(model.children())
        transformer = children[0] if children else None
        hf_model = getattr(transformer, "auto_model", None)
        config = getattr(hf_model, "config", None)
        if name is None:
            name = getattr(config, "name_or_path", None) or type(model).__name__
        self.name = name
        if hf_model is None:
            raise ConfigurationError(
                f"{SETTING}={unlocked_layers!r}: {name} does not start with a transformers model "
                "(a sentence-transformers Transformer module), so it has no layers to unlock; "
                'use 0 or "all"'
            )
        found = layer_stack(hf_model)
        count = getattr(config, "num_hidden_layers", None)
        if found is None:
            raise ConfigurationError(
                f"{SETTING}={unlocked_layers!r}: {name} ({type(hf_model).__name__}) has no list "
                f"of config.num_hidden_layers={count!r} transformer layers to split; "
                'use 0 or "all"'
            )
        stack_name, stack = found
        self.layer_count = len(stack)
        if (
            isinstance(unlocked_layers, bool)
            or not isinstance(unlocked_layers, int)
            or not 1 <= unlocked_layers <= self.layer_count
        ):
            raise ConfigurationError(
                f"{SETTING}={unlocked_layers!r}: {name} has {self.layer_count} transformer layers; "
                f'expected 0..{self.layer_count} or "all"'
            )
        self.unlocked_layers = unlocked_layers
        first = self.layer_count - unlocked_layers
        self.boundary = f"layer {first + 1} of {self.layer_count}"
        self.transformer = transformer
        self.layers: tuple[nn.Module, ...] = tuple(stack[first:])
        self.after: tuple[nn.Module, ...] = tuple(children[1:])
        self.output_key = getattr(transformer, "module_output_name", None) or "token_embeddings"

        trained_ids = {id(p) for module in (*self.layers, *self.after) for p in module.parameters()}
        self.unlocked_parameters = frozenset(
            param_name for param_name, param in model.named_parameters() if id(param) in trained_ids
        )
        ran, self.probe_difference = self._probe(transformer, stack_name, name)
        self.frozen_modules, around = self._frozen_modules(ran)
        frozen_ids = {
            id(p)
            for module_name in self.frozen_modules
            for p in model.get_submodule(module_name).parameters()
        }
        if frozen_ids & trained_ids:
            raise ConfigurationError(
                f"{SETTING}={unlocked_layers}: {name} shares weights between its first {first} "
                "layers and the unlocked ones, so the frozen part would change as they train; "
                'use 0 or "all"'
            )
        self.prefix_state_names = self._prefix_state(around)

    def _frozen_modules(self, ran: list[nn.Module]) -> tuple[tuple[str, ...], list[str]]:
        """The outermost modules the prefix ran that hold no unlocked layer, in running order.

        Also returns the modules the prefix entered around the layer stack (the transformer, its
        encoder), which hold unlocked layers and so are not frozen as a whole.
        """
        names = {id(module): module_name for module_name, module in self.model.named_modules()}
        layer_names = [names[id(layer)] for layer in self.layers]
        around = [
            names[id(module)]
            for module in ran
            if any(layer.startswith(names[id(module)] + ".") for layer in layer_names)
        ]
        frozen: list[str] = []
        for module in ran:
            module_name = names[id(module)]
            inside = any(module_name.startswith(kept + ".") for kept in frozen)
            # The first unlocked layer's pre-hooks run before the prefix stops.
            if module_name in around or module_name in layer_names or inside:
                continue
            frozen.append(module_name)
        return tuple(frozen), around

    def _prefix_state(self, around: list[str]) -> frozenset[str]:
        """State-dict keys of the frozen modules, and what the modules around the stack hold
        themselves (kept to be safe: a cache key may name more than the prefix reads, not less)."""
        state = self.model.state_dict(keep_vars=True)
        depends = {
            key for key in state for kept in self.frozen_modules if key.startswith(kept + ".")
        }
        for module_name in around:
            module = self.model.get_submodule(module_name)
            own = [n for n, _ in module.named_parameters(recurse=False)]
            own += [n for n, _ in module.named_buffers(recurse=False)]
            depends.update(f"{module_name}.{n}" if module_name else n for n in own)
        return frozenset(key for key in depends if key in state)

    def _probe(
        self, transformer: nn.Module, stack_name: str, name: str
    ) -> tuple[list[nn.Module], float]:
        """Run both halves and the whole model on the probe captions, in eval mode.

        Returns the transformer's modules the prefix ran, in order, and the largest difference
        between ``suffix(*prefix(tokens))`` and the whole model's sentence embedding.
        """
        modes = {module: module.training for module in self.model.modules()}
        ran: list[nn.Module] = []
        seen: set[int] = set()

        def record(module: nn.Module, args: object) -> None:
            if id(module) not in seen:
                seen.add(id(module))
                ran.append(module)

        hooks = [module.register_forward_pre_hook(record) for module in transformer.modules()]
        self.model.eval()
        try:
            with torch.no_grad():
                tokens = self.tokenize(list(PROBE_CAPTIONS))
                try:
                    hidden, mask = self.prefix(tokens)
                finally:
                    for hook in hooks:
                        hook.remove()
                self.hidden_size = int(hidden.shape[-1])
                split = self.suffix(hidden, mask)
                whole = self.model(dict(tokens))["sentence_embedding"]
        except ConfigurationError:
            raise
        except Exception as exc:
            raise ConfigurationError(
                f"{SETTING}={self.unlocked_layers}: {name} cannot be split at {self.boundary} "
                f'({stack_name}): {type(exc).__name__}: {exc}; use 0 or "all"'
            ) from exc
        finally:
            for module, training in modes.items():
                module.train(training)
        difference = (split - whole).abs().max().item() if split.shape == whole.shape else None
        if difference is None or not torch.allclose(split, whole, atol=PROBE_ATOL, rtol=PROBE_RTOL):
            shown = (
                f"{difference:.3g}"
                if difference is not None
                else f"shape {tuple(split.shape)}, not {tuple(whole.shape)}"
            )
            raise ConfigurationError(
                f"{SETTING}={self.unlocked_layers}: {name} cannot be split at {self.boundary}: "
                f"its last {self.unlocked_layers} layers run alone differ from the whole model "
                f"by up to {shown} (its layers take another attention-mask format or more "
                'inputs); use 0 or "all"'
            )
        return ran, float(difference)

    def tokenize(self, captions: list[str]) -> dict[str, Tensor]:
        """Tokens as the model makes them, on the model's device."""
        tokenize = getattr(self.model, "preprocess", None) or self.model.tokenize
        device = self.model.device
        return {
            key: value.to(device) if isinstance(value, Tensor) else value
            for key, value in tokenize(captions).items()
        }

    def prefix(self, tokens: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Hidden states (B, T, H) entering the first unlocked layer, and the (B, T) mask.

        The model runs up to that layer and stops there, so the frozen part costs only itself.
        Gradients follow the caller's grad mode.
        """
        captured: list[Tensor] = []

        def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _PrefixDone

        hook = self.layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.transformer(dict(tokens))
        except _PrefixDone:
            pass
        finally:
            hook.remove()
        if not captured:
            raise ConfigurationError(
                f"{SETTING}={self.unlocked_layers}: {self.name} never reached {self.boundary}, "
                'so it cannot be split there; use 0 or "all"'
            )
        hidden = captured[0]
        mask = tokens.get("attention_mask")
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return hidden, mask

    def suffix(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """The sentence embedding (B, D) from the prefix's hidden states and attention mask.

        Rows may be padded to any length (zero hidden states, mask 0): padded positions are
        masked out of attention and pooling.
        """
        additive = _additive_mask(attention_mask.to(hidden.device), hidden.dtype)
        for layer in self.layers:
            out = layer(hidden, additive)
            hidden = out[0] if isinstance(out, tuple) else out
        features: dict[str, Tensor] = {self.output_key: hidden, "attention_mask": attention_mask}
        for module in self.after:
            features = module(features)
        return features["sentence_embedding"]
