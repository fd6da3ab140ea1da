"""Choosing which layers of a model to watch: by name, glob pattern, module type or predicate.

The default, "every hidden layer", is decided by the model's structure (see :func:`select_layers`): the outputs of
its repeated blocks when it has a stack of them (transformers, ResNets), else the outputs of its nonlinearities.
Modules are recognised by role, not only by exact class, so that library classes (Hugging Face's
``GELUActivation``, ``Conv1D``, ``LlamaRMSNorm``, timm's activations) count as what they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_interp.errors import LightningInterpError

__all__ = [
    "named_submodules",
    "INPUT",
    "Layer",
    "LayerSelector",
    "NONLINEARITIES",
    "NORMALIZATIONS",
    "WEIGHT_LAYERS",
    "is_nonlinearity",
    "is_normalization",
    "is_weight_layer",
    "residual_blocks",
    "stem_layer",
    "select_layers",
    "glob_to_regex",
    "called_functionally",
    "never_ran_message",
    "normalization_layers",
    "last_linear",
    "first_tensor",
    "called_functionally",
]

INPUT = "input"

NONLINEARITIES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.GLU,
)  # fmt: skip

NORMALIZATIONS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)  # fmt: skip

WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Library activations are their own classes (transformers' GELUActivation, NewGELUActivation, QuickGELUActivation,
# SiLUActivation, ...; timm's GELUTanh, Swish, HardMish, ...): a parameter-free leaf module whose class name names
# a nonlinearity. "LinearActivation" (the identity) and "Identity" are not nonlinearities.
_ACTIVATION_NAME = re.compile(
    r"(?i)(gelu|relu|silu|swish|mish|tanh|sigmoid|elu|softplus|softsign|activation)"
)
_NOT_ACTIVATION_NAME = re.compile(r"(?i)^(linear|identity)")
_NORM_NAME = re.compile(r"(LayerNorm|RMSNorm|GroupNorm|BatchNorm\dd?|ScaleNorm)$")

LayerSelector = str | type | Callable[[str, nn.Module], bool]


@dataclass(frozen=True)
class Layer:
    """A watched layer: its dotted name in the model and the module (``None`` for the model input).

    Example:
        >>> Layer("input", None).is_input, Layer("fc", nn.Linear(2, 2)).is_input
        (True, False)
    """

    name: str
    module: nn.Module | None

    @property
    def is_input(self) -> bool:
        return self.module is None


def named_submodules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every submodule (not the model itself) with its dotted name, ``torch.compile`` wrappers seen through: the
    layers of a compiled ``net`` keep the names they have uncompiled (``net.relu1``, not ``net._orig_mod.relu1``).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> wrapped = nn.Module()
        >>> wrapped.net = torch.compile(net, backend="eager")
        >>> [name for name, _ in named_submodules(wrapped)]
        ['net', 'net.0', 'net.1']
    """
    found = []
    for name, module in model.named_modules():
        if not name or type(module).__name__ == "OptimizedModule":
            continue
        found.append((".".join(part for part in name.split(".") if part != "_orig_mod"), module))
    return found


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def is_nonlinearity(module: nn.Module) -> bool:
    """Whether ``module`` is an activation function: one of :data:`NONLINEARITIES`, or a leaf module without
    parameters whose class name names one (``GELUActivation``, ``NewGELUActivation``, ``QuickGELU``, ``Swish``).

    Example:
        >>> class NewGELUActivation(nn.Module):
        ...     def forward(self, x):
        ...         return nn.functional.gelu(x, approximate="tanh")
        >>> is_nonlinearity(nn.ReLU()), is_nonlinearity(NewGELUActivation()), is_nonlinearity(nn.Identity())
        (True, True, False)
    """
    if isinstance(module, NONLINEARITIES):
        return True
    name = type(module).__name__
    return (
        _is_leaf(module)
        and next(module.parameters(recurse=False), None) is None
        and _ACTIVATION_NAME.search(name) is not None
        and _NOT_ACTIVATION_NAME.search(name) is None
    )


def is_normalization(module: nn.Module, extra_types: Sequence[type[nn.Module]] = ()) -> bool:
    """Whether ``module`` normalizes: one of :data:`NORMALIZATIONS` or ``extra_types``, or a module whose class
    name ends in ``LayerNorm``/``RMSNorm``/``GroupNorm``/``BatchNorm*d`` and that has a ``weight`` (``LlamaRMSNorm``,
    ``T5LayerNorm``).

    Example:
        >>> class LlamaRMSNorm(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.ones(4))
        >>> is_normalization(nn.LayerNorm(4)), is_normalization(LlamaRMSNorm()), is_normalization(nn.Linear(2, 2))
        (True, True, False)
    """
    if isinstance(module, NORMALIZATIONS + tuple(extra_types)):
        return True
    return _NORM_NAME.search(type(module).__name__) is not None and isinstance(
        getattr(module, "weight", None), torch.Tensor
    )


def is_weight_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a linear map with a weight matrix: ``nn.Linear``, ``nn.Conv1d/2d/3d``, or a
    ``Conv1D`` (Hugging Face's GPT-2 linear layer, weight stored ``(in, out)``).

    Example:
        >>> is_weight_layer(nn.Linear(2, 3)), is_weight_layer(nn.ReLU())
        (True, False)
    """
    if isinstance(module, WEIGHT_LAYERS):
        return True
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2


def _is_layer_module(module: nn.Module) -> bool:
    """A single layer (activation, normalization, weight layer, dropout, embedding), never a block."""
    return (
        _is_leaf(module)
        or is_nonlinearity(module)
        or is_normalization(module)
        or is_weight_layer(module)
        or isinstance(module, (nn.Dropout, nn.Embedding, nn.MultiheadAttention))
    )


def residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's repeated blocks, in registration order: the children of an ``nn.ModuleList``/``nn.Sequential``
    of which at least two are composite modules (not single layers) of one class — ``BertLayer`` in
    ``bert.encoder.layer``, ``GPT2Block`` in ``transformer.h``, ``TransformerEncoderLayer`` in ``layers``, ResNet
    ``BasicBlock`` s. Every other module of a block class found that way counts too (a ResNet stage holding a single
    block). Stacks inside stacks: where a block holds blocks of its own, the inner ones are kept (the finest
    residual stream). Empty for plain chains of layers (an MLP, a small CNN).

    Example:
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return x + self.fc(x).relu()
        >>> net = nn.Sequential(nn.Linear(2, 4), Block(), Block(), nn.Linear(4, 3))
        >>> [name for name, _ in residual_blocks(net)]
        ['1', '2']
        >>> residual_blocks(nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU()))
        []
    """
    named = named_submodules(model)
    block_classes: set[type] = set()
    for _, container in [("", model), *named]:
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        counts: dict[type, int] = {}
        for child in container.children():
            if not _is_layer_module(child):
                counts[type(child)] = counts.get(type(child), 0) + 1
        block_classes |= {cls for cls, count in counts.items() if count >= 2}
    if not block_classes:
        return []
    blocks = [(n, m) for n, m in named if type(m) in block_classes]
    # innermost: drop a block that holds another block
    return [(n, m) for n, m in blocks if not any(other.startswith(n + ".") for other, _ in blocks)]


def stem_layer(model: nn.Module, blocks: Sequence[tuple[str, nn.Module]]) -> Layer | None:
    """The module whose output enters the first block (the embedding of a transformer, the stem of a ResNet), by
    registration order: the last module registered before the first block that is not one of its ancestors, lifted
    to the outermost module that ends with it (``bert.embeddings``, not ``bert.embeddings.dropout``). ``None`` when
    nothing is registered before the blocks.

    Example:
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 4)
        >>> net = nn.Sequential(nn.Sequential(nn.Linear(2, 4), nn.Dropout()), Block(), Block(), nn.Linear(4, 3))
        >>> stem_layer(net, residual_blocks(net)).name
        '0'
    """
    if not blocks:
        return None
    named = named_submodules(model)
    first = blocks[0][0]
    ancestors = {".".join(first.split(".")[:i]) for i in range(1, first.count(".") + 1)}
    position = {n: i for i, (n, _) in enumerate(named)}
    before = [(n, m) for n, m in named[: position[first]] if n not in ancestors]
    if not before:
        return None
    last = name = before[-1][0]
    while "." in name:
        parent = name.rsplit(".", 1)[0]
        if parent in ancestors or [n for n, _ in named if n.startswith(parent + ".")][-1] != last:
            break
        name = parent
    module = dict(named)[name]
    return Layer(name, module)


def called_functionally(model: nn.Module) -> dict[str, str]:
    """Submodules whose parent uses their weights functionally, so that their forward hooks never run, with the
    module to watch instead: ``nn.MultiheadAttention`` computes its output projection with ``F.linear(...,
    out_proj.weight)`` (both its fast and slow paths), never calling ``out_proj``.

    Example:
        >>> layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        >>> called_functionally(layer)
        {'self_attn.out_proj': 'self_attn'}
    """
    found: dict[str, str] = {}
    for name, module in named_submodules(model):
        if isinstance(module, nn.MultiheadAttention):
            found[f"{name}.out_proj"] = name
    return found


def never_ran_message(names: Sequence[str], functional: dict[str, str]) -> str:
    """The start of the one warning a callback gives for watched layers whose forward hooks never ran, with the module
    to watch instead for those :func:`called_functionally` knows.

    Example:
        >>> never_ran_message(["spare", "attn.out_proj"], {"attn.out_proj": "attn"})
        'the forward hooks of `spare`, `attn.out_proj` (nn.MultiheadAttention applies it functionally: watch `attn`) never ran (modules called functionally, or not in this forward)'
    """
    hints = [
        f"`{name}` (nn.MultiheadAttention applies it functionally: watch `{functional[name]}`)"
        if name in functional
        else f"`{name}`"
        for name in names
    ]
    return f"the forward hooks of {', '.join(hints)} never ran (modules called functionally, or not in this forward)"


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """A layer pattern as a regular expression over dotted names: ``*`` matches within one level (no dot), ``**``
    across levels, ``?`` one character of a level, ``[...]`` a character class.

    Example:
        >>> names = ["encoder.layer.0", "encoder.layer.0.attention", "encoder.layer.1"]
        >>> [n for n in names if glob_to_regex("encoder.layer.*").fullmatch(n)]
        ['encoder.layer.0', 'encoder.layer.1']
        >>> [n for n in names if glob_to_regex("encoder.**").fullmatch(n)]
        ['encoder.layer.0', 'encoder.layer.0.attention', 'encoder.layer.1']
    """
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif char == "*":
            out.append(r"[^.]*")
            i += 1
        elif char == "?":
            out.append(r"[^.]")
            i += 1
        elif char == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(char))
            i += 1
    return re.compile("".join(out))


def select_layers(
    model: nn.Module,
    layers: LayerSelector | Sequence[LayerSelector] | None = None,
    include_input: bool = True,
) -> list[Layer]:
    """Resolve a layer selection against ``model``.

    The default, "every hidden layer", follows the model's structure:

    1. a model with repeated blocks (:func:`residual_blocks`: transformer layers, ResNet blocks): the output of
       every block (the residual stream after it), preceded by the output of the module that feeds the first
       block (:func:`stem_layer`: the embeddings, a ResNet's stem);
    2. otherwise the output of every nonlinearity module (:func:`is_nonlinearity`, library activations included);
    3. for a model that applies its nonlinearities functionally (no such module), every weight layer except the
       last one (the output layer).

    ``input`` (the model input) comes first when ``include_input``; callers drop it at run time when the input is
    not a float tensor (token ids).

    Args:
        model: the network.
        layers: ``None`` for the default, or one or several of: a module name (``"net.3"``), a glob pattern
            (``"encoder.layer.*"``: ``*`` matches within one level of the dotted name, ``**`` across levels),
            ``"input"``, a module type (``nn.ReLU``), or a predicate ``(name, module) -> bool``.
        include_input: with the default selection, put the model input first as layer ``input``.

    Raises:
        LightningInterpError: a name or pattern matches nothing; the message lists the valid names.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> [layer.name for layer in select_layers(net)]
        ['input', '1', '3']
        >>> [layer.name for layer in select_layers(net, ["input", "[02]"])]
        ['input', '0', '2']
        >>> encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 3)
        >>> [layer.name for layer in select_layers(encoder, include_input=False)]
        ['layers.0', 'layers.1', 'layers.2']
    """
    named = named_submodules(model)
    if layers is None:
        result = [Layer(INPUT, None)] if include_input else []
        blocks = residual_blocks(model)
        if blocks:
            stem = stem_layer(model, blocks)
            return result + ([stem] if stem is not None else []) + [Layer(n, m) for n, m in blocks]
        chosen = [(n, m) for n, m in named if is_nonlinearity(m)]
        if not chosen:
            chosen = [(n, m) for n, m in named if is_weight_layer(m)][:-1]
        return result + [Layer(n, m) for n, m in chosen]

    selectors: Iterable[LayerSelector]
    if isinstance(layers, (str, type)) or callable(layers) and not isinstance(layers, Sequence):
        selectors = [layers]  # type: ignore[list-item]
    else:
        selectors = layers
    picked: dict[str, Layer] = {}
    for selector in selectors:
        matches = _match(named, selector)
        if not matches:
            valid = [INPUT] + [n for n, _ in named]
            shown = ", ".join(valid[:60]) + (" ..." if len(valid) > 60 else "")
            raise LightningInterpError(
                f"Expected argument `layers` to select modules of the model, but {selector!r} matches nothing. "
                f"Valid names: {shown}."
            )
        for layer in matches:
            picked.setdefault(layer.name, layer)
    # keep the model's own order (input first), whatever the order of the selectors
    order = {INPUT: -1, **{n: i for i, (n, _) in enumerate(named)}}
    return sorted(picked.values(), key=lambda layer: order[layer.name])


def _match(named: list[tuple[str, nn.Module]], selector: LayerSelector) -> list[Layer]:
    if isinstance(selector, str):
        regex = glob_to_regex(selector)
        out = [Layer(INPUT, None)] if regex.fullmatch(INPUT) else []
        return out + [Layer(n, m) for n, m in named if regex.fullmatch(n)]
    if isinstance(selector, type):
        return [Layer(n, m) for n, m in named if isinstance(m, selector)]
    if callable(selector):
        return [Layer(n, m) for n, m in named if selector(n, m)]
    raise LightningInterpError(
        "Expected argument `layers` to hold names, glob patterns, module types or predicates, "
        f"but got {type(selector).__name__}."
    )


def normalization_layers(
    model: nn.Module, extra_types: Sequence[type[nn.Module]] = ()
) -> list[Layer]:
    """Every normalization layer of ``model`` (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm, and library
    classes by role: :func:`is_normalization`).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2), nn.LayerNorm(2))
        >>> [layer.name for layer in normalization_layers(net)]
        ['1', '4']
    """
    return [Layer(n, m) for n, m in named_submodules(model) if is_normalization(m, extra_types)]


def last_linear(model: nn.Module) -> Layer | None:
    """The last ``nn.Linear`` registered in ``model`` (usually the classification head), or ``None``.

    Example:
        >>> last_linear(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))).name
        '2'
    """
    found = [Layer(n, m) for n, m in named_submodules(model) if isinstance(m, nn.Linear)]
    return found[-1] if found else None


def first_tensor(value: object, key: str | int | None = None) -> torch.Tensor | None:
    """The tensor a layer produced: the value itself, ``value[key]``, or the first tensor of a tuple/list/dict
    (a Hugging Face ``ModelOutput`` is a dict). A nested tensor (``nn.TransformerEncoder``'s fast path with a
    padding mask) comes back padded with zeros.

    Example:
        >>> first_tensor((torch.ones(2), None)).tolist(), first_tensor({"a": 1, "b": torch.zeros(1)}).tolist()
        ([1.0, 1.0], [0.0])
    """
    if isinstance(value, torch.Tensor):
        picked = value
    elif key is not None:
        try:
            picked = value[key]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return None
    else:
        items = list(value.values()) if isinstance(value, dict) else value
        picked = None
        if isinstance(items, (tuple, list)):
            picked = next((item for item in items if isinstance(item, torch.Tensor)), None)
    if not isinstance(picked, torch.Tensor):
        return None
    if picked.is_nested:
        picked = picked.to_padded_tensor(0.0)
    return picked
