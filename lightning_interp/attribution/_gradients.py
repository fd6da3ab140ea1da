"""Machinery shared by the gradient attribution functions: target handling, a gradient scope that leaves no trace
on the model, and chunked evaluation of input gradients at many points (interpolants, noisy copies)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lightning_interp.batches import logits_of
from lightning_interp.errors import LightningInterpError

__all__ = [
    "Target",
    "Forward",
    "as_target",
    "gradient_scope",
    "chunk_size",
    "points_per_pass",
    "saved_bytes",
    "input_gradients",
    "prepare_inputs",
    "example_rows",
]

Target = int | Sequence[int] | torch.Tensor | None
Forward = Callable[..., object]
#: evaluates the points ``start:stop`` (a chunk ``x``) and returns what the model returns: ``forward(x, start, stop)``
PointForward = Callable[[torch.Tensor, int, int], object]

# Points per forward/backward pass when the caller does not choose. The first pass takes a few points and
# counts the bytes ``b`` the model saves per point for its backward; the rest go in equal passes of about
# ``2**16 / sqrt(b)`` points. Per point, a pass costs its fixed overhead spread over its ``n`` points plus a memory
# cost that grows with the pass's ``n * b`` bytes (cache misses; fresh pages from the OS once freed memory is
# returned to it); ``a / n + c * n * b`` is lowest at ``n = sqrt(a / (c * b))``. The constant is fitted on a
# 2-core x86 CPU (see docs/saliency.md): 30 points for ResNet-18 at width 64, 60 at width 16, 328 for the digits
# CNN. Each pass keeps at most 256 MB (binding above 16 MB per point) and 1,024 points.
# On an accelerator (CUDA, MPS) there is no page fault (a caching allocator) and a pass's fixed cost is hundreds of
# kernel launches, so passes are as large as 1 GB of saved activations allows, at most 4,096 points (not measured:
# no GPU has been lent to this project's sessions yet).
_PASS_SCALE = 2**16
_MAX_BYTES_PER_PASS = 256 * 2**20
_PROBE_POINTS = 32
_MAX_CHUNK = 1024
_ACCELERATOR_BYTES_PER_PASS = 2**30
_ACCELERATOR_MAX_CHUNK = 4096


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
    """The model output for each row's target class, shape ``(n,)``. A Hugging Face ``ModelOutput`` (or a dict,
    tuple or list) gives its ``logits`` or first tensor (:func:`~lightning_interp.batches.logits_of`)."""
    if not isinstance(output, torch.Tensor):
        output = logits_of(output) if output is not None and not isinstance(output, str) else None
    if not isinstance(output, torch.Tensor):
        raise LightningInterpError(
            "Expected the model to return a tensor of scores (or an output holding `logits`), but it returned "
            f"{type(output).__name__}; "
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


def _materialized(model: Forward, buffers: bool) -> list[torch.Tensor]:
    """The model's parameters (and buffers) that exist already: lazy ones, materialized by the model's first
    forward, can be neither frozen nor located in memory yet. Nothing for a model that is not a module."""
    if not isinstance(model, nn.Module):
        return []
    tensors = [*model.parameters(), *(model.buffers() if buffers else ())]
    return [t for t in tensors if not nn.parameter.is_lazy(t)]


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
    params = _materialized(model, buffers=False)
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


def chunk_size(internal_batch_size: int | None) -> int | None:
    """The caller's ``internal_batch_size``, checked; ``None`` stays (:func:`input_gradients` then chooses).

    Example:
        >>> chunk_size(64), chunk_size(None) is None
        (64, True)
        >>> chunk_size(0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        lightning_interp.errors.LightningInterpError: Expected argument `internal_batch_size` to be an int ...
    """
    if internal_batch_size is None:
        return None
    bad = isinstance(internal_batch_size, bool) or not isinstance(internal_batch_size, int)
    if bad or internal_batch_size < 1:
        raise LightningInterpError(
            "Expected argument `internal_batch_size` to be an int >= 1 or None, "
            f"but got {internal_batch_size!r}."
        )
    return internal_batch_size


def points_per_pass(saved_bytes_per_point: float, device: torch.device | None = None) -> int:
    """Points per forward/backward pass for a model that saves ``saved_bytes_per_point`` for its backward: on
    the CPU ``2**16 / sqrt(saved_bytes_per_point)``, keeping at most 256 MB and 1,024 points per pass; on an
    accelerator (``device`` other than CPU) as many as keep 1 GB, at most 4,096.

    Example:
        >>> points_per_pass(4.5 * 2**20), points_per_pass(1.1 * 2**20)  # ResNet-18, 32x32, width 64 / 16
        (30, 61)
        >>> points_per_pass(40 * 2**10), points_per_pass(300 * 2**20)  # a CNN on 8x8 digits; a huge model
        (323, 1)
        >>> points_per_pass(4.5 * 2**20, torch.device("cuda")), points_per_pass(40 * 2**10, torch.device("cuda"))
        (227, 4096)
    """
    per_point = max(float(saved_bytes_per_point), 1.0)
    if device is not None and device.type != "cpu":
        points = min(_ACCELERATOR_BYTES_PER_PASS / per_point, _ACCELERATOR_MAX_CHUNK)
    else:
        points = min(_PASS_SCALE / per_point**0.5, _MAX_BYTES_PER_PASS / per_point, _MAX_CHUNK)
    return max(1, int(points))


@contextmanager
def saved_bytes(model: Forward) -> Iterator[list[int]]:
    """Count the bytes of the tensors autograd saves for the backward inside the block (each storage once,
    the model's parameters and buffers excluded); yields a one-item list holding the count. The saved tensors
    are kept as they are. Hooks do not nest in PyTorch: inside the block a caller's own saved-tensor hooks
    (e.g. ``torch.autograd.graph.save_on_cpu``) do not apply, and the parts of a model that checkpoint their
    activations (``torch.utils.checkpoint``) are not counted. :func:`input_gradients` counts only in the first
    of several passes.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        >>> x = torch.ones(10, 4, requires_grad=True)
        >>> with saved_bytes(net) as count:
        ...     y = net(x)
        >>> count[0]  # the input of the linear layer and the output of the ReLU: 10*4 + 10*8 floats
        480
    """
    owned = {t.untyped_storage().data_ptr() for t in _materialized(model, buffers=True)}
    seen: set[int] = set()
    count = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in owned and key not in seen:
                seen.add(key)
                count[0] += storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a storage (sparse, some subclasses)
            pass
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield count


def input_gradients(
    model: Forward,
    total: int,
    points: Callable[[int, int], torch.Tensor],
    targets: Callable[[int, int], torch.Tensor | None],
    chunk: int | None = None,
    forward: PointForward | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """For ``total`` points made ``chunk`` at a time by ``points(start, stop)``, yield ``(start, stop, grad)``:
    the gradient of the sum of the target outputs w.r.t. the points. The model runs as ``model(x)``, or as
    ``forward(x, start, stop)`` when given (the other arguments a model takes, such as an attention mask, must
    follow each point's example: see :func:`example_rows`). With ``chunk=None`` the first pass takes
    32 points (all of them when there are at most 48) and measures what the model saves for its backward, and
    the rest go in equal passes of at most :func:`points_per_pass` points. Call inside :func:`gradient_scope`.

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

    def gradient(start: int, stop: int) -> torch.Tensor:
        x = points(start, stop).detach().requires_grad_(True)
        output = model(x) if forward is None else forward(x, start, stop)
        selected = select_outputs(output, targets(start, stop))
        grad = None
        if selected.requires_grad:  # an output that does not depend on the input has a zero gradient
            (grad,) = torch.autograd.grad(selected.sum(), x, allow_unused=True)
        return torch.zeros_like(x) if grad is None else grad

    first = 0
    if chunk is None:
        # all at once when a second pass would be small: at most 1.5x the probe's memory, one pass fewer
        first = total if total <= _PROBE_POINTS * 3 // 2 else _PROBE_POINTS
        if first == total:  # one pass, nothing to size (counting what autograd saves costs ~15% of a small pass)
            if total:
                yield 0, total, gradient(0, total)
            return
        with saved_bytes(model) as count:
            grad = gradient(0, first)
        yield 0, first, grad
        remaining = total - first  # in equal passes: no small, slow remainder at the end
        passes = -(-remaining // points_per_pass(count[0] / first, grad.device))
        chunk = -(-remaining // passes)
    for start in range(first, total, chunk):
        stop = min(total, start + chunk)
        yield start, stop, gradient(start, stop)


def example_rows(
    forward_kwargs: Mapping[str, object] | None, index: torch.Tensor | slice, batch_size: int
) -> dict[str, object]:
    """The other arguments of the model for points whose examples are ``index``: every tensor with one row per
    example (first dimension ``batch_size``) is indexed, everything else is passed as it is; tensors made under
    ``torch.inference_mode()`` are cloned (autograd cannot save them).

    Example:
        >>> kwargs = {"attention_mask": torch.tensor([[1, 1], [1, 0]]), "scale": 2.0}
        >>> rows = example_rows(kwargs, torch.tensor([1, 1, 0]), batch_size=2)
        >>> rows["attention_mask"].tolist(), rows["scale"]
        ([[1, 0], [1, 0], [1, 1]], 2.0)
    """
    picked: dict[str, object] = {}
    for name, value in (forward_kwargs or {}).items():
        if isinstance(value, torch.Tensor) and value.is_inference():
            value = value.clone()
        per_example = isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch_size
        if per_example and not isinstance(index, slice):
            value = value[index.to(value.device)]  # type: ignore[index]
        elif per_example:
            value = value[index]  # type: ignore[index]
        picked[name] = value
    return picked
