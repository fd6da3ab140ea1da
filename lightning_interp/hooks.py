"""The one place that registers hooks on a user's model, and activation capture built on it.

Every callback owns one :class:`HookManager`; callbacks never call ``register_*_hook`` themselves. A manager removes
all its handles in :meth:`HookManager.remove`, which callbacks call from ``teardown`` *and* ``on_exception``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_interp._warnings import ProblemCounter
from lightning_interp.layers import Layer, first_tensor

__all__ = ["HookManager", "ActivationCapture", "count_hooks"]

Reducer = Callable[[str, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class HookManager:
    """Registers module hooks and owns their handles until :meth:`remove`.

    Usable as a context manager, which removes the hooks on exit, exceptions included.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> seen = []
        >>> with HookManager() as hooks:
        ...     _ = hooks.forward(net[1], lambda module, args, out: seen.append(out.shape))
        ...     _ = net(torch.zeros(3, 2))
        >>> seen, count_hooks(net)
        ([torch.Size([3, 2])], 0)
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def forward(self, module: nn.Module, hook: Callable[..., Any], with_kwargs: bool = False) -> RemovableHandle:
        """``module.register_forward_hook(hook)``, owned by this manager."""
        handle = module.register_forward_hook(hook, with_kwargs=with_kwargs)
        self._handles.append(handle)
        return handle

    def forward_pre(
        self, module: nn.Module, hook: Callable[..., Any], with_kwargs: bool = False
    ) -> RemovableHandle:
        """``module.register_forward_pre_hook(hook)``, owned by this manager."""
        handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
        self._handles.append(handle)
        return handle

    @staticmethod
    def tensor(tensor: torch.Tensor, hook: Callable[[torch.Tensor], Any]) -> None:
        """A gradient hook on one tensor of the current graph; it is freed with the graph, so no handle is kept."""
        if tensor.requires_grad:
            tensor.register_hook(hook)

    def remove(self) -> None:
        """Remove every hook this manager registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> HookManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def count_hooks(model: nn.Module) -> int:
    """Number of module hooks (forward, pre-forward, backward) registered on ``model`` and its submodules.

    Example:
        >>> count_hooks(nn.Linear(2, 2))
        0
    """
    total = 0
    for module in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            total += len(getattr(module, attr, {}))
    return total


class ActivationCapture:
    """Captures the outputs of chosen layers on each forward, detached and reduced on capture.

    A module called several times in one forward (a shared ReLU) yields one entry per call site, named ``name``,
    ``name@1``, ``name@2``, ...; :meth:`clear` (called at every batch start) resets the call counts. Layers whose
    output is a tuple/list/dict give their first tensor (or ``output_key``); non-tensor outputs are skipped and
    reported once. The model input (layer ``input``) is not hooked: callers add it from the batch with :meth:`put`.
    ``mask`` (set by the caller for each batch: its ``attention_mask``) is handed to the reducer, which uses it for
    ``(B, T, D)`` outputs; ``fired`` collects the names of the layers whose hooks ran while active.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> capture = ActivationCapture([Layer("1", net[1])])
        >>> capture.attach()
        >>> capture.active = True
        >>> _ = net(torch.ones(5, 4))
        >>> {name: tuple(t.shape) for name, t in capture.activations.items()}
        {'1': (5, 3)}
        >>> capture.detach(); count_hooks(net)
        0
    """

    def __init__(
        self,
        layers: list[Layer],
        reducer: Reducer | None = None,
        output_key: str | int | None = None,
        problems: ProblemCounter | None = None,
        hooks: HookManager | None = None,
    ) -> None:
        self.layers = [layer for layer in layers if not layer.is_input]
        self.reducer = reducer
        self.output_key = output_key
        self.problems = problems or ProblemCounter(type(self).__name__)
        self.hooks = hooks if hooks is not None else HookManager()  # a callback passes its own manager
        self.active = False
        self.mask: torch.Tensor | None = None
        self.fired: set[str] = set()
        self.activations: dict[str, torch.Tensor] = {}
        self._calls: defaultdict[str, int] = defaultdict(int)

    def attach(self) -> None:
        self.detach()
        for layer in self.layers:
            self.hooks.forward(layer.module, self._make_hook(layer.name))  # type: ignore[arg-type]

    def detach(self) -> None:
        self.hooks.remove()
        self.clear()

    def clear(self) -> None:
        self.activations = {}
        self._calls.clear()

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Store an activation that does not come from a hook (the model input)."""
        tensor = tensor.detach()
        self.activations[name] = self.reducer(name, tensor, self.mask) if self.reducer else tensor

    def _make_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self.active:
                return
            self.fired.add(name)
            call = self._calls[name]
            self._calls[name] = call + 1
            key = name if call == 0 else f"{name}@{call}"
            tensor = first_tensor(output, self.output_key)
            if tensor is None:
                self.problems.report(
                    "non_tensor_output",
                    f"layer `{name}` returned {type(output).__name__}, not a tensor; it is skipped"
                    " (set `output_key` to pick a tensor from a tuple or dict)",
                )
                return
            self.put(key, tensor)

        return hook
