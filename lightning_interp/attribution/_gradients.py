"""Machinery shared by the gradient attribution functions: target handling, a gradient scope that leaves no trace
on the model, and chunked evaluation of input gradients at many points (interpolants, noisy copies)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lightning_interp.errors import LightningInterpError

__all__ = ["Target", "Forward", "as_target", "gradient_scope", "chunk_size", "input_gradients", "prepare_inputs"]

Target = int | Sequence[int] | torch.Tensor | None
Forward = Callable[[torch.Tensor], torch.Tensor]

# Points per forward/backward pass when the caller does not choose: large enough that per-call overhead is small,
# small enough that activation memory stays bounded (about 2**19 input elements, 32..2048 points).
_CHUNK_ELEMENTS = 2**19
_MIN_CHUNK, _MAX_CHUNK = 32, 2048


def as_target(target: Target, batch_size: int, device: torch.device) -> torch.Tensor | None:
    """``target`` as a ``(batch_size,)`` int64 tensor of class indices (``None`` stays ``None``).

    Example:
        >>> as_target(2, batch_size=3, device=torch.device("cpu"))
        tensor([2, 2, 2])
        >>> as_target(torch.tensor([[0], [4]], dtype=torch.int32), batch_size=2, device=torch.device("cpu"))
        tensor([0, 4])
        >>> as_target(None, batch_size=3, device=torch.device("cpu")) is None
        True
        >>> as_target([0, 1], batch_size=3, device=torch.device("cpu"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        lightning_interp.errors.LightningInterpError: Expected argument `target` to be an int or hold one ...
    """
    if target is None:
        return None
    if isinstance(target, bool):
        raise LightningInterpError(f"Expected argument `target` to be an int class index, but got {target!r}.")
    if isinstance(target, int):
        values = torch.full((batch_size,), target, dtype=torch.long, device=device)
    else:
        values = torch.as_tensor(target, device=device)
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise LightningInterpError(
                f"Expected argument `target` to hold integer class indices, but got dtype {values.dtype}."
            )
        values = values.long().reshape(-1)
        if values.numel() == 1:
            values = values.expand(batch_size)
        if values.numel() != batch_size:
            raise LightningInterpError(
                f"Expected argument `target` to be an int or hold one class index per example ({batch_size}), "
                f"but got {values.numel()} values."
            )
    if values.numel() and int(values.min()) < 0:
        raise LightningInterpError(
            f"Expected argument `target` to hold class indices >= 0, but got {int(values.min())}."
        )
    return values


def select_outputs(output: object, target: torch.Tensor | None) -> torch.Tensor:
    """The model output for each row's target class, shape ``(n,)``."""
    if not isinstance(output, torch.Tensor):
        raise LightningInterpError(
            f"Expected the model to return a tensor of scores, but it returned {type(output).__name__}; "
            "wrap the model in a function that returns the logits tensor."
        )
    if target is None:
        if output.dim() == 1 or (output.dim() == 2 and output.shape[1] == 1):
            return output.reshape(-1)
        raise LightningInterpError(
            f"Expected argument `target` to name a class: the model returns scores of shape {tuple(output.shape)}."
        )
    if output.dim() != 2:
        raise LightningInterpError(
            f"Expected the model to return (batch, classes) scores, but got shape {tuple(output.shape)}; "
            "wrap the model in a function that returns them."
        )
    if target.numel() and int(target.max()) >= output.shape[1]:
        raise LightningInterpError(
            f"Expected argument `target` to hold class indices in [0, {output.shape[1]}), "
            f"but got {int(target.max())}."
        )
    return output.gather(1, target.view(-1, 1)).squeeze(1)


@contextmanager
def gradient_scope(model: Forward) -> Iterator[None]:
    """Gradients on (even under ``no_grad``/``inference_mode``), the model's parameters frozen meanwhile so no
    weight gradient is computed or stored; their ``requires_grad`` flags are restored on exit, exceptions included.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> with torch.no_grad(), gradient_scope(model):
        ...     frozen = not model.weight.requires_grad
        ...     x = prepare_inputs(torch.ones(4, 3)).requires_grad_(True)
        ...     (grad,) = torch.autograd.grad(model(x)[:, 1].sum(), x)
        >>> frozen, bool(torch.equal(grad, model.weight[1].detach().expand(4, 3)))
        (True, True)
        >>> model.weight.requires_grad, model.weight.grad is None
        (True, True)
    """
    params = list(model.parameters()) if isinstance(model, nn.Module) else []
    flags = [p.requires_grad for p in params]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for p in params:
                p.requires_grad_(False)
            yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def prepare_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """A detached clone usable by autograd (inference tensors cannot be); call inside :func:`gradient_scope`.

    Example:
        >>> with torch.inference_mode():
        ...     batch = torch.ones(2, 3)
        >>> with gradient_scope(nn.Identity()):
        ...     x = prepare_inputs(batch).requires_grad_(True)
        >>> batch.is_inference(), x.is_inference(), x.requires_grad
        (True, False, True)
        >>> prepare_inputs(torch.arange(3))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        lightning_interp.errors.LightningInterpError: Expected argument `inputs` to be a floating-point ...
    """
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point() or inputs.dim() < 1:
        raise LightningInterpError(
            "Expected argument `inputs` to be a floating-point tensor with a batch dimension, but got "
            + (f"{inputs.dtype} {tuple(inputs.shape)}." if isinstance(inputs, torch.Tensor) else f"{type(inputs).__name__}.")
        )
    return inputs.detach().clone()


def chunk_size(internal_batch_size: int | None, example_shape: Sequence[int], total: int) -> int:
    """Points per pass: the caller's ``internal_batch_size``, else a size bounded by input elements.

    Example:
        >>> chunk_size(None, (1, 8, 8), total=10_000)  # small inputs: capped at 2048 points
        2048
        >>> chunk_size(None, (3, 224, 224), total=10_000)  # large inputs: at least 32 points
        32
        >>> chunk_size(None, (3, 224, 224), total=5), chunk_size(64, (3, 224, 224), total=10_000)
        (5, 64)
    """
    if internal_batch_size is not None:
        bad = isinstance(internal_batch_size, bool) or not isinstance(internal_batch_size, int)
        if bad or internal_batch_size < 1:
            raise LightningInterpError(
                f"Expected argument `internal_batch_size` to be an int >= 1 or None, but got {internal_batch_size!r}."
            )
        return internal_batch_size
    numel = 1
    for d in example_shape:
        numel *= int(d)
    return max(1, min(total, max(_MIN_CHUNK, min(_MAX_CHUNK, _CHUNK_ELEMENTS // max(numel, 1)))))


def input_gradients(
    model: Forward,
    total: int,
    points: Callable[[int, int], torch.Tensor],
    targets: Callable[[int, int], torch.Tensor | None],
    chunk: int,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """For ``total`` points made ``chunk`` at a time by ``points(start, stop)``, yield ``(start, stop, grad)``:
    the gradient of the sum of the target outputs w.r.t. the points. Call inside :func:`gradient_scope`.

    Example:
        >>> model = nn.Linear(2, 3)
        >>> x = torch.randn(5, 2)
        >>> points = lambda start, stop: x[start:stop]
        >>> targets = lambda start, stop: torch.ones(stop - start, dtype=torch.long)  # class 1 everywhere
        >>> with gradient_scope(model):
        ...     parts = list(input_gradients(model, 5, points, targets, chunk=2))
        >>> [(start, stop, tuple(grad.shape)) for start, stop, grad in parts]
        [(0, 2, (2, 2)), (2, 4, (2, 2)), (4, 5, (1, 2))]
        >>> bool(torch.equal(torch.cat([g for _, _, g in parts]), model.weight[1].detach().expand(5, 2)))
        True
    """
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        x = points(start, stop).detach().requires_grad_(True)
        selected = select_outputs(model(x), targets(start, stop))
        grad = None
        if selected.requires_grad:  # an output that does not depend on the input has a zero gradient
            (grad,) = torch.autograd.grad(selected.sum(), x, allow_unused=True)
        yield start, stop, torch.zeros_like(x) if grad is None else grad
