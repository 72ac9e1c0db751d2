"""Cutting a timm image model into a frozen prefix and a trainable suffix.

With ``model.image_tower.unlocked_blocks: N`` only the last N of timm's coarse parameter groups
(blocks or stages) and the final norm/head layers train. Everything below them is frozen, so its
output, the feature map entering the first unlocked block, can be computed once and cached; a
training step then runs only the suffix. This module decides where that cut lies for any timm model
and runs the two halves.

The cut is found on a torch.fx trace of the backbone (with timm's own untraceable modules and
functions kept whole), at the first operation that runs inside an unlocked block or uses an
unlocked parameter. The halves are run by an interpreter over the backbone itself, so they always
use its current weights, device and dtype. A split is checked at construction: the suffix of the
prefix must reproduce the backbone's output on a probe batch, in eval mode and in train mode.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from timm.models import get_notrace_functions, get_notrace_modules, group_parameters
from torch import Tensor, fx, nn

from adaptalign.common.errors import ConfigurationError

SETTING = "model.image_tower.unlocked_blocks"

# The trailing ordinal timm's group matchers give layers that belong to the group before them
# (the final norm after the last block, an EfficientNet's conv_head): here, the top.
MERGE_WITH_PREVIOUS = 99999

# The probe batch a split is checked on, and how close its two routes must agree.
PROBE_IMAGES = 2
PROBE_SEED = 0
ATOL = 1e-5
RTOL = 1e-4


@dataclass(frozen=True)
class ImageSplit:
    """Where a timm backbone is cut for ``unlocked_blocks`` and how to run each half.

    ``prefix`` gives the feature map entering the first unlocked block (what the data side
    caches); ``suffix`` takes it to the backbone's pooled features. The graphs hold no weights:
    both halves run on whatever backbone is passed, so moving it or loading weights into it never
    leaves the split behind.
    """

    model_name: str
    unlocked_blocks: int
    block_count: int
    boundary: str
    unlocked_parameters: frozenset[str]
    frozen_modules: tuple[str, ...]
    prefix_state_names: frozenset[str]
    prefix_shape: tuple[int, ...]
    prefix_graph: fx.Graph = field(repr=False, compare=False)
    eval_suffix_graph: fx.Graph = field(repr=False, compare=False)
    train_suffix_graph: fx.Graph = field(repr=False, compare=False)
    eval_constants: dict[str, Tensor] = field(repr=False, compare=False)
    train_constants: dict[str, Tensor] = field(repr=False, compare=False)

    def prefix(self, backbone: nn.Module, images: Tensor) -> Tensor:
        """The feature map entering the first unlocked block, for a batch of images.

        Traced in eval mode whatever the backbone's mode: the prefix is frozen, and its cached
        output must not depend on whether the tower is training. Its layers that keep their own
        mode (batch norm, dropout) are the ``frozen_modules`` the tower holds in eval mode.
        """
        return _Run(backbone, self.prefix_graph, self.eval_constants).run(images)

    def suffix(self, backbone: nn.Module, hidden: Tensor) -> Tensor:
        """The backbone's pooled features ``(B, num_features)`` from the prefix's feature map.

        Follows the backbone's mode: layers that behave differently in training (stochastic depth,
        attention dropout) were traced both ways, and the graph for the current mode runs.
        """
        if backbone.training:
            return _Run(backbone, self.train_suffix_graph, self.train_constants).run(hidden)
        return _Run(backbone, self.eval_suffix_graph, self.eval_constants).run(hidden)


def image_block_count(backbone: nn.Module, model_name: str) -> int:
    """How many blocks ``unlocked_blocks`` can unlock: timm's coarse groups between stem and top."""
    return len(_parameter_groups(backbone, model_name).blocks)


def split_image_model(
    backbone: nn.Module, model_name: str, unlocked_blocks: int, input_size: tuple[int, int, int]
) -> ImageSplit:
    """Cut ``backbone`` (a timm model built with ``num_classes=0``) below its last N blocks.

    ``input_size`` is one image's ``(channels, height, width)``, used for the probe batch that
    checks the split and gives ``prefix_shape``. Refuses with ``ConfigurationError`` a model timm
    cannot group, an N outside ``1..block_count``, and a cut that does not pass exactly one tensor
    from prefix to suffix or does not reproduce the backbone's output.
    """
    groups = _parameter_groups(backbone, model_name)
    count = len(groups.blocks)
    if isinstance(unlocked_blocks, bool) or not isinstance(unlocked_blocks, int):
        raise ConfigurationError(
            f'{SETTING}={unlocked_blocks!r}: expected a whole number 0..{count} or "all"'
        )
    if not 1 <= unlocked_blocks <= count:
        raise ConfigurationError(
            f"{SETTING}={unlocked_blocks}: {model_name} has {count} blocks (timm's stage "
            f'grouping); expected 0..{count} or "all"'
        )
    unlocked = frozenset(groups.top.union(*groups.blocks[count - unlocked_blocks :]))
    first_block = groups.blocks[count - unlocked_blocks]
    where = f"{SETTING}={unlocked_blocks} for {model_name}"

    eval_trace, train_trace = (_trace(backbone, training, where) for training in (False, True))
    eval_cut = _cut(backbone, eval_trace, unlocked, where)
    train_cut = _cut(backbone, train_trace, unlocked, where)
    if eval_cut.boundary != train_cut.boundary:
        raise ConfigurationError(
            f"{where}: the cut lies at {eval_cut.boundary} in eval mode but at "
            f"{train_cut.boundary} in train mode; the cached prefix would not fit the training one"
        )
    prefix_shape = _check(backbone, eval_cut, train_cut, input_size, where)

    state_names = list(backbone.state_dict())
    touched = _touched_targets(eval_cut.prefix) | _touched_targets(train_cut.prefix)
    return ImageSplit(
        model_name=model_name,
        unlocked_blocks=unlocked_blocks,
        block_count=count,
        boundary=_block_module(backbone, first_block) or eval_cut.boundary,
        unlocked_parameters=unlocked,
        frozen_modules=tuple(
            dict.fromkeys(_called_modules(eval_cut.prefix) + _called_modules(train_cut.prefix))
        ),
        prefix_state_names=frozenset(
            name for name in state_names if any(_within(name, target) for target in touched)
        ),
        prefix_shape=prefix_shape,
        prefix_graph=eval_cut.prefix,
        eval_suffix_graph=eval_cut.suffix,
        train_suffix_graph=train_cut.suffix,
        eval_constants=eval_cut.constants,
        train_constants=train_cut.constants,
    )


def image_parameter_depths(backbone: nn.Module, model_name: str, setting: str) -> dict[str, int]:
    """Each parameter's depth below the top, for a learning rate that decays with depth.

    0 for the top (final norm, head: what trains whenever any block does), k for the k-th of
    timm's blocks counted from the top, one more for the stem. ``setting`` names the option
    that asked, for the error on a model timm cannot group.
    """
    try:
        groups = _parameter_groups(backbone, model_name)
    except ConfigurationError as exc:
        reason = exc.__cause__ or "no group_matcher"  # timm's own words where it refused
        raise ConfigurationError(
            f"{setting}: timm cannot group {model_name}'s layers into blocks ({reason}), so "
            "they have no depth to decay the learning rate by; use 1 (no decay)"
        ) from exc
    depths = dict.fromkeys(groups.top, 0)
    for above, block in enumerate(reversed(groups.blocks), start=1):
        depths.update(dict.fromkeys(block, above))
    depths.update(dict.fromkeys(groups.stem, len(groups.blocks) + 1))
    return depths


@dataclass(frozen=True)
class _Groups:
    """A backbone's parameter names in timm's coarse groups: stem, blocks in order, and top."""

    stem: frozenset[str]
    blocks: list[frozenset[str]]
    top: frozenset[str]


def _parameter_groups(backbone: nn.Module, model_name: str) -> _Groups:
    """timm's coarse grouping, with the top (final norm, head, unmatched layers) taken out.

    timm folds the top into the last block's group or puts it last on its own; either way it must
    train whenever any block does, so it is kept apart and never counted as a block.
    """
    group_matcher = getattr(backbone, "group_matcher", None)
    if not callable(group_matcher):
        raise ConfigurationError(
            f"{SETTING}: {model_name} has no timm block grouping (group_matcher), so it cannot be "
            'partly unlocked; use 0 (frozen) or "all"'
        )
    try:
        matcher = group_matcher(coarse=True)
        group_of = group_parameters(backbone, matcher, reverse=True)
        is_top = _top_test(matcher)
        top = frozenset(name for name in group_of if is_top(name))
    except Exception as exc:  # timm refuses some models with an assertion or NotImplementedError
        raise ConfigurationError(
            f"{SETTING}: timm cannot group {model_name}'s layers into blocks ({exc}); "
            'use 0 (frozen) or "all"'
        ) from exc
    members: dict[int, set[str]] = {}
    for name, group in group_of.items():
        if name not in top:
            members.setdefault(group, set()).add(name)
    ordered = [frozenset(members[group]) for group in sorted(members)]
    stem = ordered[0] if ordered and 0 in members else frozenset()
    blocks = ordered[1:] if stem else ordered
    return _Groups(stem=stem, blocks=blocks, top=top)


def _top_test(matcher: object) -> Callable[[str], bool]:
    """Whether a parameter belongs to the top, read off timm's matcher as timm reads it.

    A dict matcher's first matching pattern decides; a pattern whose trailing ordinal is
    ``MERGE_WITH_PREVIOUS`` marks the top, and names no pattern matches go last, as the top too.
    A function matcher marks them with that ordinal or infinity.
    """
    if isinstance(matcher, dict):
        patterns: list[tuple[re.Pattern[str], bool]] = []
        for spec in matcher.values():
            if spec is None:
                continue
            if isinstance(spec, (tuple, list)):
                for pattern, ordinal in spec:
                    top = ordinal is not None and tuple(ordinal)[-1] == MERGE_WITH_PREVIOUS
                    patterns.append((re.compile(pattern), top))
            else:
                patterns.append((re.compile(spec), False))

        def is_top(name: str) -> bool:
            return next((top for pattern, top in patterns if pattern.match(name)), True)

        return is_top
    if callable(matcher):

        def is_top(name: str) -> bool:
            ordinal = matcher(name)
            last = tuple(ordinal)[-1] if isinstance(ordinal, (tuple, list)) else ordinal
            return last == MERGE_WITH_PREVIOUS or math.isinf(last)

        return is_top
    raise TypeError(f"group_matcher returned {type(matcher).__name__}, not a dict or a function")


def _block_module(backbone: nn.Module, names: frozenset[str]) -> str:
    """The module that is a block group, e.g. ``blocks.6`` or ``layer4``; '' if no one module is.

    Starts from the deepest module holding all the group's parameters and climbs while the parent
    holds nothing else, so a stage with a single block is still named by the stage.
    """
    parts = [name.split(".")[:-1] for name in names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    while common and _holds_only(backbone, ".".join(common[:-1]), names):
        common.pop()
    return ".".join(common) if common and _holds_only(backbone, ".".join(common), names) else ""


def _holds_only(backbone: nn.Module, module: str, names: frozenset[str]) -> bool:
    """Whether a submodule's parameters all belong to one group (the backbone itself never)."""
    if not module:
        return False
    inside = backbone.get_submodule(module).named_parameters(prefix=module)
    return {name for name, _ in inside} <= names


class _TimmTracer(fx.Tracer):
    """torch.fx tracing that keeps timm's registered untraceable modules and functions whole."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self.leaves = tuple(get_notrace_modules())

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        """timm's untraceable modules run as single calls, besides torch's own layers."""
        return isinstance(module, self.leaves) or super().is_leaf_module(module, qualified_name)


@contextmanager
def _mode(backbone: nn.Module, training: bool) -> Iterator[None]:
    """Put every module in one mode for a while, then give each back the mode it had."""
    before = {module: module.training for module in backbone.modules()}
    backbone.train(training)
    try:
        yield
    finally:
        for module, mode in before.items():
            module.training = mode


@dataclass(frozen=True)
class _Trace:
    """A traced forward and the tensors it fixed as constants.

    A tensor the forward derives from a buffer outside any traced operation (a Swin window's
    position index, an EVA's rotary table) is recorded as a constant; the split keeps it rather
    than leave it on the model.
    """

    graph: fx.Graph
    constants: dict[str, Tensor]


def _trace(backbone: nn.Module, training: bool, where: str) -> _Trace:
    """The backbone's forward as a graph in one mode (tracing fixes mode-dependent branches).

    Optional forward arguments (a ViT's attention mask) are fixed at their defaults, as the tower
    calls the backbone with images alone.
    """
    parameters = list(inspect.signature(backbone.forward).parameters.values())[1:]
    fixed = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    attributes = set(vars(backbone))
    try:
        with _mode(backbone, training):
            graph = _TimmTracer().trace(backbone, concrete_args=fixed or None)
    except Exception as exc:  # tracing fails with many kinds of errors on data-dependent code
        raise ConfigurationError(f"{where}: torch.fx cannot trace the model ({exc})") from exc
    finally:  # the tracer stores its constants on the model: take them back off
        constants = {name: vars(backbone)[name] for name in set(vars(backbone)) - attributes}
        for name in constants:
            delattr(backbone, name)
    return _Trace(graph=graph, constants=constants)


class _Run(fx.Interpreter):
    """Runs a graph on the backbone as it is now, serving the trace's constants beside it.

    A constant moves to the device of the values the graph runs on the first time it is needed
    there and stays, so a split made on the CPU works on a GPU without copying at every step.
    """

    def __init__(self, backbone: nn.Module, graph: fx.Graph, constants: dict[str, Tensor]) -> None:
        super().__init__(backbone, graph=graph)
        self.constants = constants
        self.device: torch.device | None = None

    def run(self, *args: object, **kwargs: object) -> object:
        """Run on one input, remembering its device for the constants."""
        self.device = next((a.device for a in args if isinstance(a, Tensor)), None)
        return super().run(*args, **kwargs)

    def fetch_attr(self, target: str) -> object:
        """A constant of the trace, on the input's device, else the backbone's attribute."""
        if target not in self.constants:
            return super().fetch_attr(target)
        constant = self.constants[target]
        if self.device is not None and constant.device != self.device:
            constant = self.constants[target] = constant.to(self.device)
        return constant


@dataclass(frozen=True)
class _Cut:
    """One trace cut in two: prefix and suffix graphs, the first unlocked operation, constants."""

    prefix: fx.Graph
    suffix: fx.Graph
    boundary: str
    constants: dict[str, Tensor]


def _unlocked_modules(backbone: nn.Module, unlocked: frozenset[str]) -> set[str]:
    """Submodules all of whose parameters train: whatever runs inside them is above the cut."""
    found = set()
    for name, module in backbone.named_modules():
        owned = [parameter for parameter, _ in module.named_parameters(prefix=name)]
        if name and owned and all(parameter in unlocked for parameter in owned):
            found.add(name)
    return found


def _place(node: fx.Node) -> str:
    """Where a node runs, for messages: its module or attribute, else its innermost module."""
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    stack = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
    operation = getattr(node.target, "__name__", str(node.target))
    return f"{stack[-1]} ({operation})" if stack else operation


def _above_cut(
    backbone: nn.Module, node: fx.Node, unlocked: set[int], unlocked_modules: set[str]
) -> bool:
    """Whether a node belongs to the unlocked layers.

    It does if it runs inside a module that trains entirely (so a block's reshaping before its
    first weight stays with the block) or computes with an unlocked parameter, through a module
    owning one or the tensor itself.
    """
    stack = {path for path, _ in node.meta.get("nn_module_stack", {}).values()}
    if stack & unlocked_modules:
        return True
    if node.op not in ("call_module", "get_attr"):
        return False
    target = _attribute(backbone, str(node.target))
    if isinstance(target, nn.Module):
        return any(id(parameter) in unlocked for parameter in target.parameters())
    return id(target) in unlocked


def _attribute(backbone: nn.Module, target: str) -> object:
    """The object a graph node's dotted target names on the backbone."""
    value: object = backbone
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _cut(backbone: nn.Module, trace: _Trace, unlocked: frozenset[str], where: str) -> _Cut:
    """Split a trace where the unlocked layers begin.

    Exactly one value computed before that point may be used after it (the feature map); the
    parameters and buffers the suffix reads are fetched again there rather than passed along.
    """
    unlocked_ids = {id(p) for name, p in backbone.named_parameters() if name in unlocked}
    unlocked_modules = _unlocked_modules(backbone, unlocked)
    nodes = list(trace.graph.nodes)
    start = next(
        (
            i
            for i, node in enumerate(nodes)
            if node.target not in trace.constants
            and _above_cut(backbone, node, unlocked_ids, unlocked_modules)
        ),
        None,
    )
    if start is None:
        raise ConfigurationError(f"{where}: the traced model never uses its unlocked layers")
    before = set(nodes[:start])
    crossing = list(
        dict.fromkeys(
            used
            for node in nodes[start:]
            for used in node.all_input_nodes
            if used in before and used.op != "get_attr"
        )
    )
    if len(crossing) != 1:
        names = ", ".join(node.name for node in crossing) or "nothing"
        raise ConfigurationError(
            f"{where}: the layers below the cut at {_place(nodes[start])} pass {names} to the "
            "layers above it, not one feature map, so their output cannot be cached"
        )
    (hidden,) = crossing

    prefix = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    for node in nodes[:start]:  # all of them: an in-place op's result may go unused
        copies[node] = prefix.node_copy(node, copies.__getitem__)
    prefix.output(copies[hidden])

    suffix = fx.Graph()
    copies = {hidden: suffix.placeholder("hidden")}
    for node in nodes[:start]:
        if node.op == "get_attr" and any(user not in before for user in node.users):
            copies[node] = suffix.node_copy(node)
    for node in nodes[start:]:
        copies[node] = suffix.node_copy(node, copies.__getitem__)
    return _Cut(
        prefix=prefix, suffix=suffix, boundary=_place(nodes[start]), constants=trace.constants
    )


def _called_modules(graph: fx.Graph) -> list[str]:
    """The submodules a graph calls, in order: in the prefix, the ones the tower keeps in eval."""
    return list(dict.fromkeys(str(n.target) for n in graph.nodes if n.op == "call_module"))


def _touched_targets(graph: fx.Graph) -> set[str]:
    """The submodules and attributes a graph reads, whose state its output depends on."""
    return {str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")}


def _within(name: str, target: str) -> bool:
    """Whether a state_dict key is the target itself or lies inside that submodule."""
    return name == target or name.startswith(target + ".")


def _check(
    backbone: nn.Module,
    eval_cut: _Cut,
    train_cut: _Cut,
    input_size: tuple[int, int, int],
    where: str,
) -> tuple[int, ...]:
    """Run a probe batch both ways in each mode; the prefix's per-image shape if they agree.

    The probe images come from their own seeded generator and train mode's random layers from a
    forked generator state, so checking disturbs no one's random numbers; buffers train mode
    updates (batch norm statistics) are put back.
    """
    reference = next(iter(backbone.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else None
    generator = torch.Generator().manual_seed(PROBE_SEED)
    images = torch.randn((PROBE_IMAGES, *input_size), generator=generator)
    images = images.to(device=device, dtype=dtype or torch.get_default_dtype())
    buffers = {name: b.detach().clone() for name, b in backbone.named_buffers()}
    devices = []
    if device.type == "cuda":  # train mode's random layers draw from the model's GPU
        devices = [torch.cuda.current_device() if device.index is None else device.index]
    shapes = []
    try:
        with torch.no_grad():
            for training, cut in ((False, eval_cut), (True, train_cut)):
                with _mode(backbone, training), torch.random.fork_rng(devices=devices):
                    torch.manual_seed(PROBE_SEED)
                    expected = backbone(images)
                    torch.manual_seed(PROBE_SEED)
                    hidden = _Run(backbone, cut.prefix, cut.constants).run(images)
                    actual = _Run(backbone, cut.suffix, cut.constants).run(hidden)
                if not isinstance(hidden, Tensor):
                    raise ConfigurationError(
                        f"{where}: the layers below the cut pass a {type(hidden).__name__}, "
                        "not one feature map, so their output cannot be cached"
                    )
                _compare(expected, actual, "train" if training else "eval", where)
                shapes.append(tuple(hidden.shape[1:]))
    finally:
        with torch.no_grad():
            for name, value in backbone.named_buffers():
                if name in buffers:
                    value.copy_(buffers[name])
    return shapes[0]


def _compare(expected: object, actual: object, mode: str, where: str) -> None:
    """Refuse a split whose suffix does not give the backbone's own output."""
    if not isinstance(expected, Tensor) or not isinstance(actual, Tensor):
        raise ConfigurationError(
            f"{where}: the backbone gives a {type(expected).__name__} in {mode} mode, not one "
            "tensor of pooled features"
        )
    if expected.shape != actual.shape:
        raise ConfigurationError(
            f"{where}: in {mode} mode the split gives shape {tuple(actual.shape)}, the backbone "
            f"{tuple(expected.shape)}"
        )
    if not torch.allclose(actual, expected, atol=ATOL, rtol=RTOL):
        difference = (actual - expected).abs().max().item()
        raise ConfigurationError(
            f"{where}: in {mode} mode the split's output differs from the backbone's by up to "
            f"{difference:.3g}, so the cut is not faithful"
        )
