"""Choosing which layers of a model to watch: by name, glob pattern, module type or predicate."""

from __future__ import annotations

import fnmatch
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
    "select_layers",
    "normalization_layers",
    "last_linear",
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

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

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


def select_layers(
    model: nn.Module,
    layers: LayerSelector | Sequence[LayerSelector] | None = None,
    include_input: bool = True,
) -> list[Layer]:
    """Resolve a layer selection against ``model``.

    By default, "every hidden layer": the output of every nonlinearity module; for a model that applies its
    nonlinearities functionally (no such module), every Linear/Conv layer except the last one (the output layer).
    ``input`` (the model input) comes first when ``include_input``.

    Args:
        model: the network.
        layers: ``None`` for the default, or one or several of: a module name (``"net.3"``), a glob pattern
            (``"encoder.*"``), ``"input"``, a module type (``nn.ReLU``), or a predicate ``(name, module) -> bool``.
        include_input: with the default selection, put the model input first as layer ``input``.

    Raises:
        LightningInterpError: a name or pattern matches nothing; the message lists the valid names.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> [layer.name for layer in select_layers(net)]
        ['input', '1', '3']
        >>> [layer.name for layer in select_layers(net, ["input", "[02]"])]
        ['input', '0', '2']
    """
    named = named_submodules(model)
    if layers is None:
        chosen = [(n, m) for n, m in named if isinstance(m, NONLINEARITIES)]
        if not chosen:
            weight_layers = [(n, m) for n, m in named if isinstance(m, _WEIGHT_LAYERS)]
            chosen = weight_layers[:-1]
        result = [Layer(INPUT, None)] if include_input else []
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
        out = [Layer(INPUT, None)] if fnmatch.fnmatchcase(INPUT, selector) else []
        return out + [Layer(n, m) for n, m in named if fnmatch.fnmatchcase(n, selector)]
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
    """Every normalization layer of ``model`` (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm, ...).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2), nn.LayerNorm(2))
        >>> [layer.name for layer in normalization_layers(net)]
        ['1', '4']
    """
    types = NORMALIZATIONS + tuple(extra_types)
    return [Layer(n, m) for n, m in named_submodules(model) if isinstance(m, types)]


def last_linear(model: nn.Module) -> Layer | None:
    """The last ``nn.Linear`` registered in ``model`` (usually the classification head), or ``None``.

    Example:
        >>> last_linear(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))).name
        '2'
    """
    found = [Layer(n, m) for n, m in named_submodules(model) if isinstance(m, nn.Linear)]
    return found[-1] if found else None


def first_tensor(value: object, key: str | int | None = None) -> torch.Tensor | None:
    """The tensor a layer produced: the value itself, ``value[key]``, or the first tensor of a tuple/list/dict."""
    if isinstance(value, torch.Tensor):
        return value
    if key is not None:
        try:
            picked = value[key]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return None
        return picked if isinstance(picked, torch.Tensor) else None
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                return item
    return None
