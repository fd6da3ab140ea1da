"""Gradient attributions: saliency, gradient x input, SmoothGrad, Integrated Gradients and guided backprop.

Every function takes ``(model, inputs, target, ...)`` and returns a tensor shaped like ``inputs``. The model is
called as ``model(x, **forward_kwargs)`` (Captum's ``additional_forward_args``, by keyword): the tensors of
``forward_kwargs`` with one row per example (an ``attention_mask``) follow each point's example through the noisy
copies and interpolants. A model may return a Hugging Face ``ModelOutput`` (its ``logits`` are explained).
Gradients come from ``torch.autograd.grad`` (parameters' ``.grad`` untouched); the functions work under
``torch.no_grad()`` and ``torch.inference_mode()``; parameters' ``requires_grad`` flags are restored even when the
forward raises; many points (interpolants, noisy copies) are evaluated in chunks so memory stays bounded. The
model's train/eval mode is the caller's business, as in Captum: call ``model.eval()`` first for BatchNorm and
dropout models. For token ids see :func:`~lightning_interp.attribution.embedding_attributions`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
from torch import nn

from lightning_interp._validation import check_choice, check_positive_float, check_positive_int
from lightning_interp.attribution._gradients import (
    Forward,
    Target,
    as_target,
    chunk_size,
    example_rows,
    gradient_scope,
    input_gradients,
    prepare_inputs,
    select_outputs,
)
from lightning_interp.errors import LightningInterpError
from lightning_interp.hooks import HookManager

__all__ = [
    "saliency",
    "input_x_gradient",
    "smoothgrad",
    "integrated_gradients",
    "guided_backprop",
    "IG_METHODS",
    "quadrature",
]

IntegrationMethod = Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]
IG_METHODS: tuple[str, ...] = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


ForwardKwargs = Mapping[str, object] | None


def _point_forward(model: Forward, forward_kwargs: ForwardKwargs, batch: int, example_of: object) -> object:
    """``forward(x, start, stop)`` for :func:`input_gradients`: ``model(x, **kwargs)`` with the per-example
    tensors of ``forward_kwargs`` at the examples ``example_of(start, stop)`` of the points; ``None`` (plain
    ``model(x)``) without keyword arguments."""
    if not forward_kwargs:
        return None
    return lambda x, start, stop: model(x, **example_rows(forward_kwargs, example_of(start, stop), batch))


def _plain_gradient(
    model: Forward,
    inputs: torch.Tensor,
    target: Target,
    internal_batch_size: int | None,
    forward_kwargs: ForwardKwargs = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, dF_t/dx)`` for each example; call inside :func:`gradient_scope`."""
    x = prepare_inputs(inputs)
    t = as_target(target, x.shape[0], x.device)
    grad = torch.empty_like(x)
    chunk = chunk_size(internal_batch_size)
    rows = (lambda a, b: t[a:b]) if t is not None else (lambda a, b: None)
    forward = _point_forward(model, forward_kwargs, x.shape[0], lambda a, b: slice(a, b))
    for start, stop, g in input_gradients(model, x.shape[0], lambda a, b: x[a:b], rows, chunk, forward):
        grad[start:stop] = g
    return x, grad


def saliency(
    model: Forward,
    inputs: torch.Tensor,
    target: Target,
    abs: bool = True,
    internal_batch_size: int | None = None,
    forward_kwargs: ForwardKwargs = None,
) -> torch.Tensor:
    """Gradient of the target score w.r.t. the input (Simonyan et al. 2014); its absolute value by default.

    Args:
        model: the network (or any callable mapping a batch to ``(batch, classes)`` scores).
        inputs: a batch, ``(B, ...)``.
        target: class index per example: an int, a list, or a ``(B,)`` tensor; ``None`` for ``(B,)`` outputs.
        abs: return ``|dF_t/dx|`` (Captum's ``Saliency`` default) or the signed gradient.
        internal_batch_size: examples per forward/backward pass (default: sized by what the model keeps).
        forward_kwargs: other arguments of the model's forward, by keyword (``attention_mask``).

    Example:
        >>> net = nn.Linear(3, 2)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, 0.0]]))
        >>> saliency(net, torch.randn(4, 3), target=0)[0]
        tensor([1., 2., 3.])
    """
    with gradient_scope(model):
        _, grad = _plain_gradient(model, inputs, target, internal_batch_size, forward_kwargs)
    return grad.abs() if abs else grad


def input_x_gradient(
    model: Forward,
    inputs: torch.Tensor,
    target: Target,
    internal_batch_size: int | None = None,
    forward_kwargs: ForwardKwargs = None,
) -> torch.Tensor:
    """Input times gradient, ``x * dF_t/dx`` (signed), like Captum's ``InputXGradient``.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(3.0)
        >>> input_x_gradient(net, torch.tensor([[1.0, -2.0]]), target=0)
        tensor([[ 3., -6.]])
    """
    with gradient_scope(model):
        x, grad = _plain_gradient(model, inputs, target, internal_batch_size, forward_kwargs)
    return x * grad


def smoothgrad(
    model: Forward,
    inputs: torch.Tensor,
    target: Target,
    stdev: float,
    n_samples: int = 25,
    squared: bool = False,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    abs: bool = True,
    internal_batch_size: int | None = None,
    forward_kwargs: ForwardKwargs = None,
) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017): the mean saliency over ``n_samples`` noisy copies ``x + N(0, stdev^2)``.

    ``stdev`` is an absolute standard deviation in input units. Smilkov et al. found 10-20% of the input range
    works well: for images in [0, 1] use 0.1-0.2; for standardised inputs (range about 4-6) use 0.5-1.0, i.e.
    ``stdev = 0.15 * (inputs.max() - inputs.min())``.

    Args:
        model: the network.
        inputs: a batch ``(B, ...)``.
        target: class index per example.
        stdev: noise standard deviation in input units (> 0).
        n_samples: noisy copies per example.
        squared: average the squared saliency (SmoothGrad-Squared, Captum's ``smoothgrad_sq``).
        generator: draws the noise, leaving the global RNG untouched; with ``None`` the global RNG is used. The
            noise is drawn one ``(n_samples, ...)`` block per example, in order, so for a given seed the result
            does not depend on the pass size (``internal_batch_size``, or by default what the model keeps).
        noise: the additive noise itself, ``(B, n_samples, ...)`` (example-major, as Captum's ``NoiseTunnel``
            draws it); overrides ``stdev`` and ``generator``.
        abs: absolute gradient per noisy copy (Captum's ``Saliency`` default) or the signed gradient.
        internal_batch_size: noisy copies per forward/backward pass (default: sized by what the model keeps).
        forward_kwargs: other arguments of the model's forward, by keyword; per-example tensors follow each noisy
            copy's example.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> smoothgrad(net, torch.zeros(2, 3), [0, 1], stdev=0.1, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([2, 3])
    """
    check_positive_float("stdev", stdev)
    check_positive_int("n_samples", n_samples)
    with gradient_scope(model):
        x = prepare_inputs(inputs)
        batch, shape = x.shape[0], x.shape[1:]
        t = as_target(target, batch, x.device)
        if noise is not None:
            if tuple(noise.shape) != (batch, n_samples, *shape):
                raise LightningInterpError(
                    f"Expected argument `noise` to have shape (batch, n_samples, ...) = "
                    f"{(batch, n_samples, *shape)}, but got {tuple(noise.shape)}."
                )
            flat_noise = noise.detach().reshape(batch * n_samples, *shape).to(x)

        # Drawn noise: one (n_samples, ...) block per example, in example order, so a seed gives the same noise
        # whatever the pass size. Passes come in order, so only the rows drawn and not yet used are kept.
        unused = [x.new_empty((0, *shape))]

        def drawn_noise(start: int, stop: int) -> torch.Tensor:
            parts = unused[:]
            while sum(p.shape[0] for p in parts) < stop - start:
                block = torch.randn((n_samples, *shape), generator=generator, device=x.device, dtype=x.dtype)
                parts.append(block * stdev)
            drawn = torch.cat(parts)
            unused[0] = drawn[stop - start :]
            return drawn[: stop - start]

        def points(start: int, stop: int) -> torch.Tensor:
            example = torch.arange(start, stop, device=x.device) // n_samples
            drawn = flat_noise[start:stop] if noise is not None else drawn_noise(start, stop)
            return x[example] + drawn

        def rows(start: int, stop: int) -> torch.Tensor | None:
            return None if t is None else t[torch.arange(start, stop, device=x.device) // n_samples]

        total = torch.zeros_like(x)
        chunk = chunk_size(internal_batch_size)
        example_of = lambda a, b: torch.arange(a, b, device=x.device) // n_samples  # noqa: E731
        forward = _point_forward(model, forward_kwargs, batch, example_of)
        for start, stop, grad in input_gradients(model, batch * n_samples, points, rows, chunk, forward):
            value = grad.abs() if abs else grad
            if squared:
                value = value * value
            total.index_add_(0, torch.arange(start, stop, device=x.device) // n_samples, value)
    return total / n_samples


def quadrature(method: str, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Points ``alphas`` in [0, 1] and weights of a rule for integrating over the straight path (float64).

    ``riemann_trapezoid`` is the textbook trapezoid rule (weights ``1/(n-1)``, halved at the ends; they sum to 1).
    Captum 0.9 uses weights ``1/n`` there, which sum to ``(n-1)/n``, so its trapezoid attributions are ours times
    ``(n-1)/n``. The other rules match Captum's.

    Example:
        >>> alphas, weights = quadrature("riemann_trapezoid", 3)
        >>> alphas.tolist(), weights.tolist()
        ([0.0, 0.5, 1.0], [0.25, 0.5, 0.25])
    """
    check_choice("method", method, IG_METHODS)
    n = check_positive_int("n_steps", n_steps, minimum=2 if method == "riemann_trapezoid" else 1)
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return 0.5 * (nodes + 1.0), 0.5 * weights
    if method == "riemann_trapezoid":
        weights = np.full(n, 1.0 / (n - 1))
        weights[[0, -1]] /= 2
        return np.linspace(0.0, 1.0, n), weights
    offset = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}[method]
    return (np.arange(n) + offset) / n, np.full(n, 1.0 / n)


def integrated_gradients(
    model: Forward,
    inputs: torch.Tensor,
    target: Target,
    baselines: torch.Tensor | float | None = None,
    n_steps: int = 50,
    method: IntegrationMethod = "gausslegendre",
    internal_batch_size: int | None = None,
    return_convergence_delta: bool = False,
    forward_kwargs: ForwardKwargs = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Integrated Gradients (Sundararajan et al. 2017): ``(x - x') * integral_0^1 dF_t/dx(x' + a (x - x')) da``.

    Args:
        model: the network.
        inputs: a batch ``(B, ...)``.
        target: class index per example.
        baselines: the reference ``x'``: ``None`` (zeros), a number, or a tensor broadcastable to ``inputs``.
        n_steps: points of the quadrature rule.
        method: ``gausslegendre`` or a Riemann rule (see :func:`quadrature`).
        internal_batch_size: interpolants per forward/backward pass (default: sized by what the model keeps).
        return_convergence_delta: also return ``sum(attr) - (F_t(x) - F_t(x'))`` per example (signed).
        forward_kwargs: other arguments of the model's forward, by keyword; per-example tensors follow each
            interpolant's example.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 1), nn.Tanh())
        >>> x = torch.tensor([[0.5, -1.0]])
        >>> attr, delta = integrated_gradients(net, x, None, return_convergence_delta=True)
        >>> bool(delta.abs().max() < 1e-5)
        True
    """
    alphas, weights = quadrature(method, n_steps)
    with gradient_scope(model):
        x = prepare_inputs(inputs)
        batch, shape = x.shape[0], x.shape[1:]
        t = as_target(target, batch, x.device)
        if baselines is None:
            base = torch.zeros_like(x)
        else:
            try:
                base = torch.as_tensor(baselines, dtype=x.dtype, device=x.device).detach().clone().expand_as(x)
            except RuntimeError as err:
                raise LightningInterpError(
                    f"Expected argument `baselines` to broadcast to the inputs' shape {tuple(x.shape)}, "
                    f"but got shape {tuple(torch.as_tensor(baselines).shape)}."
                ) from err
        path = x - base
        alpha = torch.as_tensor(alphas, dtype=x.dtype, device=x.device)
        weight = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
        view = (-1,) + (1,) * len(shape)

        # point i is step i // B of example i % B (step-major, as Captum orders its interpolants)
        def points(start: int, stop: int) -> torch.Tensor:
            index = torch.arange(start, stop, device=x.device)
            return base[index % batch] + alpha[index // batch].view(view) * path[index % batch]

        def rows(start: int, stop: int) -> torch.Tensor | None:
            return None if t is None else t[torch.arange(start, stop, device=x.device) % batch]

        total = torch.zeros_like(x)
        chunk = chunk_size(internal_batch_size)
        example_of = lambda a, b: torch.arange(a, b, device=x.device) % batch  # noqa: E731
        forward = _point_forward(model, forward_kwargs, batch, example_of)
        for start, stop, grad in input_gradients(model, batch * n_steps, points, rows, chunk, forward):
            index = torch.arange(start, stop, device=x.device)
            total.index_add_(0, index % batch, grad * weight[index // batch].view(view))
        attributions = total * path
        if not return_convergence_delta:
            return attributions
        with torch.no_grad():
            kwargs = dict(forward_kwargs or {})
            gap = select_outputs(model(x, **kwargs), t) - select_outputs(model(base.contiguous(), **kwargs), t)
        delta = attributions.reshape(batch, -1).sum(1) - gap
    return attributions, delta


def guided_backprop(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    internal_batch_size: int | None = None,
    forward_kwargs: ForwardKwargs = None,
) -> torch.Tensor:
    """Guided backpropagation (Springenberg et al. 2015): the gradient with every ``nn.ReLU``'s backward signal
    clamped at zero as well (only positive evidence flows back), like Captum's ``GuidedBackprop``.

    Hooks live only for the duration of the call (removed even when the forward raises); the model's modules are
    not modified. As in Captum, ReLUs applied functionally (``F.relu``) are not guided.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> guided_backprop(net, torch.randn(3, 2), None).shape
        torch.Size([3, 2])
    """
    if not isinstance(model, nn.Module):
        raise LightningInterpError(
            f"Expected argument `model` to be an nn.Module (its nn.ReLU modules are guided), but got "
            f"{type(model).__name__}."
        )

    def clamp_on_output(module: nn.Module, args: object, output: torch.Tensor) -> None:
        # d/dout clamped at 0, then ReLU's own backward masks by (x > 0): relu(grad_out) * mask = relu(grad_in)
        if isinstance(output, torch.Tensor):
            HookManager.tensor(output, lambda grad: grad.clamp(min=0))

    with HookManager() as hooks:
        for module in model.modules():
            if isinstance(module, nn.ReLU):
                hooks.forward(module, clamp_on_output)
        with gradient_scope(model):
            _, grad = _plain_gradient(model, inputs, target, internal_batch_size, forward_kwargs)
    return grad
