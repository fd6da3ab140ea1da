"""Token attributions: the gradient methods at the output of a model's input embedding layer, one score per token.

Token ids are integers: no gradient reaches them. As Captum's ``LayerIntegratedGradients`` and
``LayerGradientXActivation`` do, the attributions are taken at the output of the embedding layer, ``E = emb(ids)``
of shape ``(B, T, D)``, and each token's score is reduced over the embedding dimension. During the passes a
forward hook on the embedding layer replaces its output by the point being evaluated (``E`` itself, a noisy copy,
an interpolant between the baseline's embedding and ``E``), while the model sees the real ids everywhere else
(position embeddings, a classifier that pools at the last non-padding token). The hook lives for one call only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_interp._validation import check_choice, check_choices, check_positive_float, check_positive_int
from lightning_interp.attribution._gradients import (
    Forward,
    Target,
    as_target,
    chunk_size,
    example_rows,
    gradient_scope,
    input_gradients,
)
from lightning_interp.attribution.gradients import IntegrationMethod, quadrature
from lightning_interp.errors import LightningInterpError
from lightning_interp.hooks import HookManager
from lightning_interp.layers import Layer, named_submodules

__all__ = ["embedding_attributions", "input_embedding", "default_baseline_token", "TOKEN_METHODS", "token_maps"]

TokenMethod = Literal["saliency", "input_x_gradient", "integrated_gradients", "smoothgrad"]
TOKEN_METHODS: tuple[str, ...] = ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad")
#: SmoothGrad's default noise: this fraction of the range of the examples' embedding values (as for images)
SMOOTHGRAD_RANGE_FRACTION = 0.15


def input_embedding(model: nn.Module, name: str | None = None, argument: str = "embedding") -> Layer | None:
    """The model's input embedding layer: the module called ``name`` when given; else what
    ``get_input_embeddings()`` returns on the model or on its first submodule that has one (a LightningModule
    wrapping a Hugging Face model); else the first ``nn.Embedding``; ``None`` when there is none.

    Raises:
        LightningInterpError: ``name`` is not a module of the model (the message names ``argument`` and lists the
            model's embedding modules).

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
        >>> input_embedding(net)
        Layer(name='0', module=Embedding(10, 4))
        >>> input_embedding(net, "2").name
        '2'
        >>> input_embedding(nn.Linear(2, 2)) is None
        True
    """
    named = named_submodules(model)
    if name is not None:
        modules = dict(named)
        if not isinstance(name, str) or name not in modules:
            embeddings = [n for n, m in named if isinstance(m, nn.Embedding)]
            raise LightningInterpError(
                f"Expected argument `{argument}` to name a module of the model, but got {name!r}; its nn.Embedding "
                f"modules are {embeddings} (any module name from `model.named_modules()` is accepted)."
            )
        return Layer(name, modules[name])
    names = {id(module): n for n, module in named}
    for module in (model, *(m for _, m in named)):
        getter = getattr(module, "get_input_embeddings", None)
        if not callable(getter):
            continue
        try:
            found = getter()
        except (NotImplementedError, AttributeError, TypeError):  # Hugging Face's base class raises
            continue
        if isinstance(found, nn.Module) and id(found) in names:
            return Layer(names[id(found)], found)
    return next((Layer(n, m) for n, m in named if isinstance(m, nn.Embedding)), None)


def default_baseline_token(model: nn.Module | None, embedding: nn.Module | None = None) -> int | None:
    """The token whose embedding is Integrated Gradients' default baseline: ``config.pad_token_id`` of the model
    (or of its first submodule with a ``config``: a wrapped Hugging Face model), else the embedding's
    ``padding_idx``; ``None`` (the zero embedding) when neither is set.

    Example:
        >>> default_baseline_token(nn.Linear(2, 2), nn.Embedding(10, 4, padding_idx=1))
        1
        >>> default_baseline_token(nn.Linear(2, 2), nn.Embedding(10, 4)) is None
        True
    """
    modules = [model, *model.modules()] if isinstance(model, nn.Module) else []
    for module in modules:
        pad = getattr(getattr(module, "config", None), "pad_token_id", None)
        if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0:
            return pad
    padding_idx = getattr(embedding, "padding_idx", None)
    return padding_idx if isinstance(padding_idx, int) and padding_idx >= 0 else None


def _baseline_ids(baseline_token_id: int | torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor | None:
    if baseline_token_id is None:
        return None
    if isinstance(baseline_token_id, torch.Tensor):
        if baseline_token_id.is_floating_point():
            raise LightningInterpError(
                f"Expected argument `baseline_token_id` to hold token ids, but got dtype {baseline_token_id.dtype}."
            )
        try:
            return baseline_token_id.to(device=ids.device, dtype=ids.dtype).expand_as(ids).contiguous()
        except RuntimeError as err:
            raise LightningInterpError(
                f"Expected argument `baseline_token_id` to broadcast to the inputs' shape {tuple(ids.shape)}, but got "
                f"shape {tuple(baseline_token_id.shape)}."
            ) from err
    if isinstance(baseline_token_id, bool) or not isinstance(baseline_token_id, int) or baseline_token_id < 0:
        raise LightningInterpError(
            f"Expected argument `baseline_token_id` to be a token id (an int >= 0), but got {baseline_token_id!r}."
        )
    return torch.full_like(ids, baseline_token_id)


class _Captured(Exception):
    """Stops a forward once the embedding layer has produced its output (the rest of the model is not needed)."""


@dataclass
class _Part:
    """The points of one method in the fused pass: ``count`` points from ``offset``."""

    method: str
    offset: int
    count: int


def token_maps(
    model: Forward,
    inputs: torch.Tensor,
    target: Target,
    methods: Sequence[str],
    layer: nn.Module,
    baseline_ids: torch.Tensor | None = None,
    forward_kwargs: Mapping[str, object] | None = None,
    n_steps: int = 50,
    ig_method: str = "gausslegendre",
    stdev: float | None = None,
    n_samples: int = 25,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    internal_batch_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Every method's per-token scores in one chunked pass over all their points (the examples, their noisy
    copies, their interpolants); :func:`embedding_attributions` is this with one method. ``baseline_ids`` already
    resolved (``None``: the zero embedding), ``layer`` a module the model calls on the ids.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
        >>> maps = token_maps(net, torch.tensor([[1, 2, 3]]), 0, ["saliency", "input_x_gradient"], net[0])
        >>> {name: tuple(m.shape) for name, m in maps.items()}
        {'saliency': (1, 3), 'input_x_gradient': (1, 3)}
    """
    methods = check_choices("methods", methods, TOKEN_METHODS)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1:
        raise LightningInterpError(
            f"Expected argument `inputs` to be a tensor of token ids (B, T), but got {type(inputs).__name__}"
            + (f" of shape {tuple(inputs.shape)}." if isinstance(inputs, torch.Tensor) else ".")
        )
    if not isinstance(layer, nn.Module):
        raise LightningInterpError(f"Expected argument `embedding` to be an nn.Module, but got {type(layer).__name__}.")
    ids = inputs.detach()
    batch = ids.shape[0]
    kwargs = dict(forward_kwargs or {})
    chunk = chunk_size(internal_batch_size)
    if "integrated_gradients" in methods:
        alphas, weights = quadrature(ig_method, n_steps)
    if "smoothgrad" in methods:
        check_positive_int("n_samples", n_samples)
        if stdev is not None:
            check_positive_float("stdev", stdev)
    # what the hook does: "capture" the layer's output and stop the forward, or "substitute" the current points
    state: dict[str, Any] = {"mode": "capture", "value": None}

    def hook(module: nn.Module, args: object, output: object) -> object:
        if state["mode"] == "capture":
            state["value"] = output
            raise _Captured
        if state["mode"] != "substitute":
            return None
        substitute = state["value"]
        if not isinstance(output, torch.Tensor) or output.shape != substitute.shape:
            raise LightningInterpError(
                f"Expected the embedding layer to return a tensor of shape {tuple(substitute.shape)} in the "
                f"attribution pass, but it returned {_describe(output)}; pass the input embedding module as "
                "`embedding` (a module the model calls once per forward on the token ids)."
            )
        return substitute

    def embedded(token_ids: torch.Tensor) -> torch.Tensor:
        state["mode"], state["value"] = "capture", None
        try:
            with torch.no_grad():
                model(token_ids, **kwargs)
        except _Captured:
            pass
        value = state["value"]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise LightningInterpError(
                "Expected the embedding layer to run in the model's forward and return a float tensor, but it "
                + ("did not run" if value is None else f"returned {_describe(value)}")
                + "; pass the input embedding module (or its name) as `embedding`."
            )
        if tuple(value.shape[: ids.dim()]) != tuple(ids.shape):
            raise LightningInterpError(
                f"Expected the embedding layer's output to start with the token ids' shape {tuple(ids.shape)}, but "
                f"got shape {tuple(value.shape)}; pass the input embedding module as `embedding`."
            )
        return value.detach().clone()

    scope = model if isinstance(model, nn.Module) else layer  # parameters frozen meanwhile, flags restored
    with HookManager() as hooks, gradient_scope(scope):
        hooks.forward(layer, hook)
        emb = embedded(ids)
        shape = emb.shape[1:]
        reduce = tuple(range(ids.dim(), emb.dim()))  # the embedding dimension(s): one score per token
        t = as_target(target, batch, emb.device)

        parts: list[_Part] = []
        examples: list[torch.Tensor] = []

        def add(method: str, example: torch.Tensor) -> None:
            parts.append(_Part(method, sum(p.count for p in parts), example.numel()))
            examples.append(example)

        arange = torch.arange(batch, device=emb.device)
        if {"saliency", "input_x_gradient"} & set(methods):
            add("plain", arange)
        if "smoothgrad" in methods:
            if noise is not None:
                if tuple(noise.shape) != (batch, n_samples, *shape):
                    raise LightningInterpError(
                        "Expected argument `noise` to have shape (batch, n_samples, *embedding) = "
                        f"{(batch, n_samples, *shape)}, but got {tuple(noise.shape)}."
                    )
                drawn = noise.detach().to(emb)
            else:
                if stdev is None:
                    spread = float(emb.max() - emb.min())
                    stdev = SMOOTHGRAD_RANGE_FRACTION * spread if spread > 0 else 0.1
                drawn = torch.randn((batch, n_samples, *shape), generator=generator, device=emb.device, dtype=emb.dtype)
                drawn = drawn * stdev
            flat_noise = drawn.flatten(0, 1)
            add("smoothgrad", arange.repeat_interleave(n_samples))
        if "integrated_gradients" in methods:
            base = torch.zeros_like(emb) if baseline_ids is None else embedded(baseline_ids)
            path = emb - base
            alpha = torch.as_tensor(alphas, dtype=emb.dtype, device=emb.device)
            weight = torch.as_tensor(weights, dtype=emb.dtype, device=emb.device)
            add("integrated_gradients", arange.repeat(n_steps))  # step-major, as Captum orders its interpolants
        example = torch.cat(examples)
        total = example.numel()
        view = (-1,) + (1,) * len(shape)

        def build(part: _Part, a: int, b: int) -> torch.Tensor:
            index = torch.arange(a, b, device=emb.device)
            if part.method == "plain":
                return emb[a:b]
            if part.method == "smoothgrad":
                return emb[index // n_samples] + flat_noise[a:b]
            return base[index % batch] + alpha[index // batch].view(view) * path[index % batch]

        def pieces(start: int, stop: int) -> list[tuple[_Part, int, int]]:
            found = []
            for part in parts:
                a, b = max(start, part.offset), min(stop, part.offset + part.count)
                if a < b:
                    found.append((part, a - part.offset, b - part.offset))
            return found

        def points(start: int, stop: int) -> torch.Tensor:
            return torch.cat([build(part, a, b) for part, a, b in pieces(start, stop)])

        def rows(start: int, stop: int) -> torch.Tensor | None:
            return None if t is None else t[example[start:stop]]

        def forward(x: torch.Tensor, start: int, stop: int) -> object:
            state["mode"], state["value"] = "substitute", x
            where = example[start:stop]
            return model(ids[where], **example_rows(kwargs, where, batch))

        plain = torch.zeros_like(emb) if parts and parts[0].method == "plain" else None
        smooth = emb.new_zeros(ids.shape) if "smoothgrad" in methods else None
        integral = torch.zeros_like(emb) if "integrated_gradients" in methods else None
        for start, stop, grad in input_gradients(scope, total, points, rows, chunk, forward):
            offset = 0
            for part, a, b in pieces(start, stop):
                g = grad[offset : offset + b - a]
                offset += b - a
                index = torch.arange(a, b, device=emb.device)
                if part.method == "plain":
                    plain[a:b] = g  # type: ignore[index]
                elif part.method == "smoothgrad":
                    smooth.index_add_(0, index // n_samples, _norm(g, reduce))  # type: ignore[union-attr]
                else:
                    weighted = g * weight[index // batch].view(view)
                    integral.index_add_(0, index % batch, weighted)  # type: ignore[union-attr]
        state["mode"] = "off"

    maps: dict[str, torch.Tensor] = {}
    for method in methods:
        if method == "saliency":
            maps[method] = _norm(plain, reduce)  # type: ignore[arg-type]
        elif method == "input_x_gradient":
            maps[method] = _sum(emb * plain, reduce)
        elif method == "smoothgrad":
            maps[method] = smooth / n_samples  # type: ignore[operator]
        else:
            maps[method] = _sum(path * integral, reduce)
    return maps


def _norm(values: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return torch.linalg.vector_norm(values, dim=dims) if dims else values.abs()


def _sum(values: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return values.sum(dims) if dims else values


def embedding_attributions(
    model: Forward,
    inputs: torch.Tensor,
    target: Target,
    method: TokenMethod,
    embedding: nn.Module | str | None = None,
    baseline_token_id: int | torch.Tensor | None = None,
    forward_kwargs: Mapping[str, object] | None = None,
    n_steps: int = 50,
    ig_method: IntegrationMethod = "gausslegendre",
    stdev: float | None = None,
    n_samples: int = 25,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    internal_batch_size: int | None = None,
) -> torch.Tensor:
    """Per-token attributions of token-id inputs, taken at the output ``E = emb(ids)`` of the input embedding layer
    and reduced over the embedding dimension: the per-token scores of Captum's layer methods on that layer.

    * ``saliency``: ``||dF_t/dE||_2`` over the embedding dimension (unsigned);
    * ``input_x_gradient``: ``sum_d E * dF_t/dE`` (signed; Captum's ``LayerGradientXActivation`` summed over d);
    * ``integrated_gradients``: ``sum_d (E - E') * integral_0^1 dF_t/dE(E' + a (E - E')) da`` with ``E'`` the
      embedding of the baseline ids, interpolated in embedding space (Captum's ``LayerIntegratedGradients``);
    * ``smoothgrad``: the mean over ``n_samples`` noisy copies ``E + N(0, stdev^2)`` of the saliency above.

    The model is called as ``model(inputs, **forward_kwargs)`` (per-example tensors of ``forward_kwargs``, such as
    ``attention_mask``, follow each point's example); it may return a Hugging Face ``ModelOutput``, whose ``logits``
    are explained. The ids reach the model unchanged in every pass (a forward hook replaces the embedding layer's
    output), so position embeddings and pooling at the last non-padding token see the real tokens. The hook is
    removed on return, exceptions included; parameters' ``.grad`` and ``requires_grad`` are left as they were;
    the model's train/eval mode is the caller's business (use eval mode).

    Args:
        model: the network (or any callable when ``embedding`` is a module).
        inputs: token ids ``(B, T)``.
        target: class index per example: an int, a list, or a ``(B,)`` tensor; ``None`` for ``(B,)`` outputs.
        method: ``saliency``, ``input_x_gradient``, ``integrated_gradients`` or ``smoothgrad``.
        embedding: the input embedding layer, as a module or its name in ``model.named_modules()``; ``None``:
            found by :func:`input_embedding` (``get_input_embeddings()``, else the first ``nn.Embedding``).
        baseline_token_id: Integrated Gradients' baseline: a token id put at every position (``E'`` = its
            embedding; e.g. the pad or mask token), or a tensor of baseline ids broadcastable to ``inputs``;
            ``None``: :func:`default_baseline_token` (the model config's ``pad_token_id``, else the embedding's
            ``padding_idx``), else the zero embedding.
        forward_kwargs: other arguments of the model's forward, by keyword (``attention_mask``, ...).
        n_steps: points of the Integrated Gradients quadrature.
        ig_method: ``gausslegendre`` or a Riemann rule (see :func:`~lightning_interp.attribution.gradients.quadrature`).
        stdev: SmoothGrad noise standard deviation in embedding units; ``None``: 0.15 x (max - min) of the batch's
            embedding values (Smilkov et al.'s 10-20% of the range).
        n_samples: SmoothGrad noisy copies per example.
        generator: draws the SmoothGrad noise (one ``(B, n_samples, T, D)`` block), leaving the global RNG
            untouched; ``None``: the global RNG.
        noise: the SmoothGrad noise itself, ``(B, n_samples, T, D)``; overrides ``stdev`` and ``generator``.
        internal_batch_size: points per forward/backward pass (default: sized by what the model keeps).

    Returns:
        ``(B, T)`` scores, one per token.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> class Bag(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed = nn.Embedding(10, 4, padding_idx=0)
        ...         self.head = nn.Linear(4, 2)
        ...     def forward(self, input_ids, attention_mask):
        ...         return self.head((self.embed(input_ids) * attention_mask[..., None]).sum(1))
        >>> ids, mask = torch.tensor([[3, 5, 0]]), torch.tensor([[1, 1, 0]])
        >>> scores = embedding_attributions(Bag(), ids, 1, "integrated_gradients",
        ...                                 forward_kwargs={"attention_mask": mask}, n_steps=8)
        >>> tuple(scores.shape), float(scores[0, 2])  # the padding token: baseline = pad, no attribution
        ((1, 3), 0.0)
    """
    check_choice("method", method, TOKEN_METHODS)
    if isinstance(embedding, nn.Module):
        layer = embedding
    else:
        if not isinstance(model, nn.Module):
            raise LightningInterpError(
                f"Expected argument `embedding` to be an nn.Module when `model` is not one, but got {embedding!r}."
            )
        found = input_embedding(model, embedding, argument="embedding")
        if found is None:
            raise LightningInterpError(
                "Expected the model to have an input embedding layer (`get_input_embeddings()` or an nn.Embedding), "
                "but found none; pass the module (or its name) as `embedding`."
            )
        layer = found.module  # type: ignore[assignment]
    if baseline_token_id is None:
        baseline_token_id = default_baseline_token(model if isinstance(model, nn.Module) else None, layer)
    ids = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(inputs)
    baseline = _baseline_ids(baseline_token_id, ids) if method == "integrated_gradients" else None
    maps = token_maps(
        model, ids, target, [method], layer, baseline, forward_kwargs, n_steps, ig_method, stdev, n_samples,
        generator, noise, internal_batch_size,
    )  # fmt: skip
    return maps[method]


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__

