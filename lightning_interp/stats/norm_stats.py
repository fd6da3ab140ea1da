"""Statistics of normalization layers and hidden activations, from tensors captured by forward hooks.

Pure functions of ``(module, input, output)``: no Trainer, no hooks. Every statistic is a 0-dim float32 tensor
on the input's device, so a caller can gather many of them and move them to the host in one transfer.

Definitions (``x`` the layer input, ``y`` its output, statistics over every element of the batch):

* ``in_mean``, ``in_std``, ``out_mean``, ``out_std``: mean and (biased) standard deviation of all elements of
  ``x`` and ``y``.
* ``gamma_abs_mean``, ``beta_mean``: mean of ``|weight|`` and of ``bias`` (only for layers that have them).
* ``effective_gain``: the mean over examples and features of ``|gamma| / sigma``, where ``sigma`` is the
  standard deviation the layer *actually divides by* on this forward: BatchNorm in train mode (or without
  running statistics) the biased batch variance per channel; BatchNorm in eval mode its running variance;
  LayerNorm one sigma per example (per token for a sequence ``(B, T, D)``) over ``normalized_shape``; GroupNorm
  one per example and group; InstanceNorm one per example and channel (running statistics in eval mode when it
  tracks them); RMSNorm the root mean square per example or token, without mean subtraction. ``sigma = sqrt(var
  + eps)`` with the layer's own ``eps``; a layer without affine parameters has ``gamma = 1``.
* Library normalization classes (:func:`~lightning_interp.layers.is_normalization`: a class named ``*RMSNorm``
  or ``*LayerNorm`` with a ``weight``, such as Hugging Face's ``LlamaRMSNorm`` and ``T5LayerNorm``) normalize
  over the trailing dimensions shaped like their weight (or dimension 1, channels-first), with the epsilon in
  their ``eps`` or ``variance_epsilon`` attribute (``1e-6`` for ``*RMSNorm``, ``1e-5`` for ``*LayerNorm`` when
  they have neither). A ``*RMSNorm`` divides by the root mean square. A ``*LayerNorm`` may subtract the mean or
  not (``T5LayerNorm`` does not, despite its name): given the layer's output, the sigma is the one whose
  ``gamma * x_hat (+ bias)`` reproduces it (:func:`library_norm_sigma`); the relative error of that fit is
  reported, and callers treat a layer that fits neither form (above :data:`FIT_TOLERANCE`: Gemma's ``(1 +
  weight)`` scale, say) as of unknown gain. Without the output a ``*LayerNorm`` is taken to subtract the mean.
* BatchNorm only: ``running_mean_dist``, the mean over channels of ``|batch_mean - running_mean| /
  sqrt(running_var + eps)`` (how many running standard deviations the batch mean is away), and
  ``running_std_ratio``, the mean over channels of ``batch_std / running_std``. Both are 0 and 1 when the
  running statistics describe the batch; they measure the train/eval mismatch. The running statistics must be
  the ones from *before* the forward (a train-mode forward updates them in place): pass a snapshot.

Hidden-layer statistics (:func:`activation_stats`), "unit" = a feature of a dense output or a channel of a
conv map:

* ``act_mean``, ``act_std``: mean and biased standard deviation of all elements.
* ``saturated_frac``: fraction of elements in the flat part of a bounded nonlinearity: ``|a| > 0.99`` after
  ``Tanh``/``Hardtanh``/``Softsign`` (tanh' < 0.02 there), ``a < 0.01`` or ``a > 0.99`` after
  ``Sigmoid``/``Hardsigmoid`` (sigmoid' < 0.0099). Only for those layers.
* ``dead_frac``: fraction of units that are never positive anywhere in the batch (every example, every
  position), after ``ReLU``/``ReLU6``. Only for those layers.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = [
    "FIT_TOLERANCE",
    "library_norm_sigma",
    "is_feature_norm",
    "TANH_SATURATION",
    "SIGMOID_SATURATION",
    "SATURATING_TANH",
    "SATURATING_SIGMOID",
    "RELU_LIKE",
    "divisor_std",
    "effective_gain",
    "norm_layer_stats",
    "activation_stats",
    "snapshot_running_stats",
]

TANH_SATURATION = 0.99
"""``|tanh(x)| > 0.99`` counts as saturated (there tanh'(x) = 1 - a**2 < 0.02)."""
SIGMOID_SATURATION = 0.01
"""``sigmoid(x) < 0.01`` or ``> 0.99`` counts as saturated (there sigmoid'(x) < 0.0099)."""

SATURATING_TANH: tuple[type[nn.Module], ...] = (nn.Tanh, nn.Hardtanh, nn.Softsign)
SATURATING_SIGMOID: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid)
RELU_LIKE: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)

FIT_TOLERANCE = 1e-2
"""A library normalization whose output differs from ``gamma * x_hat (+ bias)`` by more than this (mean absolute
error relative to the mean absolute output) is not the assumed form: its effective gain is unknown."""

_TORCH_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCENORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_BATCHED_DIMS = {nn.InstanceNorm1d: 3, nn.InstanceNorm2d: 4, nn.InstanceNorm3d: 5}


def _channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) mean and biased variance of ``x`` (N, C, ...) in float32, by two passes (about twice
    as fast as ``torch.var_mean`` on CPU, and as accurate). The last few results are remembered for the very tensor
    they were computed from (same object, same version: not modified in place since), so two callers on one
    forward — NormStatsMonitor's statistics and GradFlowMonitor's gains of the same BatchNorm — pay once."""
    if x.is_inference():  # no version counter to tell an in-place change by: computed, not remembered
        return _compute_channel_moments(x.detach().float())
    key = id(x)
    remembered = _MOMENTS.get(key)
    if remembered is not None and remembered[0]() is x and remembered[1] == x._version:
        return remembered[2]
    moments = _compute_channel_moments(x.detach().float())
    if len(_MOMENTS) >= _MOMENTS_KEPT:
        _MOMENTS.pop(next(iter(_MOMENTS)))
    _MOMENTS[key] = (weakref.ref(x), x._version, moments)
    return moments


def _compute_channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dim=dims, keepdim=True)
    return mean.reshape(-1), (x - mean).square().mean(dim=dims)


# id(tensor) -> (weak reference to it, its version, its channel moments): a few per-channel vectors, never the
# tensors themselves (a weak reference keeps nothing alive; a reused id fails the identity check).
_MOMENTS: dict[int, tuple[weakref.ref, int, tuple[torch.Tensor, torch.Tensor]]] = {}
_MOMENTS_KEPT = 64


def _batchnorm_output_moments(
    module: nn.Module, moments: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of a BatchNorm's output when it normalizes by the batch's own moments:
    ``y_c = gamma_c (x_c - mu_c) / sqrt(var_c + eps) + beta_c`` has mean ``beta_c`` and variance
    ``gamma_c^2 var_c / (var_c + eps)``, so no pass over the output is needed."""
    var = moments[1]
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    scale = var / (var + module.eps)
    if isinstance(weight, torch.Tensor):
        scale = weight.detach().float().square() * scale
    mean = bias.detach().float() if isinstance(bias, torch.Tensor) else torch.zeros_like(var)
    return mean, scale


def _mean_std(
    x: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased std of all elements; from per-channel moments when given (every channel has the same
    number of elements, so mean = mean of means and var = mean of variances + variance of means)."""
    if moments is None:
        if x.dim() < 2:
            mean = x.mean()
            return mean, (x - mean).square().mean().sqrt()
        moments = _channel_moments(x)
    means, variances = moments
    mean = means.mean()
    return mean, (variances.mean() + (means - mean).square().mean()).sqrt()


def snapshot_running_stats(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A copy of a BatchNorm/InstanceNorm's ``(running_mean, running_var)`` (``None`` when it keeps none).

    Example:
        >>> snapshot_running_stats(nn.BatchNorm1d(3))[1].tolist()
        [1.0, 1.0, 1.0]
    """
    mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        return None
    return mean.detach().clone(), var.detach().clone()


def _uses_batch_stats(module: nn.Module) -> bool:
    # the rule of F.batch_norm / F.instance_norm: batch statistics in training or without running statistics
    return module.training or getattr(module, "running_var", None) is None


def divisor_std(
    module: nn.Module,
    x: torch.Tensor,
    running: tuple[torch.Tensor, torch.Tensor] | None = None,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
    output: torch.Tensor | None = None,
    diagnostics: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """The standard deviation(s) ``sqrt(var + eps)`` that ``module`` divides ``x`` by, shaped to broadcast
    against the layer's per-feature ``gamma`` after a leading batch dimension; ``None`` for unknown layer
    types.

    Shapes: BatchNorm ``(C,)``; InstanceNorm ``(N, C)``; LayerNorm and RMSNorm ``(N, 1, ..., 1)`` (one per
    example; ``(B, T, 1)`` for a sequence); GroupNorm ``(N, C)`` (each channel gets its group's sigma); library
    ``*LayerNorm``/``*RMSNorm`` classes as LayerNorm (see :func:`library_norm_sigma`, which ``output`` and
    ``diagnostics`` are handed to). ``running`` overrides the module's running statistics (pass the pre-forward
    snapshot).

    Example:
        >>> bn = nn.BatchNorm1d(2, eps=0.0)
        >>> divisor_std(bn, torch.tensor([[0.0, 1.0], [2.0, 5.0]])).tolist()
        [1.0, 2.0]
    """
    eps = getattr(module, "eps", None)
    if isinstance(module, _BATCHNORMS) and _uses_batch_stats(module):
        return ((moments or _channel_moments(x))[1] + eps).sqrt()  # the caller's tensor: shared moments
    x = x.detach().float()
    if isinstance(module, _BATCHNORMS):
        var = (running or snapshot_running_stats(module))[1].float()
        return (var + eps).sqrt()
    if isinstance(module, _INSTANCENORMS):
        batched_dims = next(d for t, d in _BATCHED_DIMS.items() if isinstance(module, t))
        batched = x if x.dim() == batched_dims else x.unsqueeze(0)
        if _uses_batch_stats(module) or not module.track_running_stats:
            return (batched.flatten(2).var(dim=2, correction=0) + eps).sqrt()
        var = (running or snapshot_running_stats(module))[1].float()
        return (var + eps).sqrt().expand(batched.shape[0], -1)
    if isinstance(module, nn.LayerNorm):
        dims = tuple(range(x.dim() - len(module.normalized_shape), x.dim()))
        return (x.var(dim=dims, correction=0, keepdim=True) + eps).sqrt()
    if isinstance(module, nn.RMSNorm):
        dims = tuple(range(x.dim() - len(module.normalized_shape), x.dim()))
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        return (x.pow(2).mean(dim=dims, keepdim=True) + eps).sqrt()
    if isinstance(module, nn.GroupNorm):
        n, c, groups = x.shape[0], x.shape[1], module.num_groups
        sigma = (x.reshape(n, groups, -1).var(dim=2, correction=0) + eps).sqrt()
        return sigma.repeat_interleave(c // groups, dim=1)
    if _library_kind(module) is not None:
        found = library_norm_sigma(module, x, output)
        if found is None:
            return None
        sigma, fit_error = found
        if diagnostics is not None and fit_error is not None:
            diagnostics["fit_error"] = fit_error
        return sigma
    return None


def _library_kind(module: nn.Module) -> str | None:
    """``"rms"`` for a ``*RMSNorm`` class, ``"layer"`` for a ``*LayerNorm`` class (mean subtraction undecided),
    ``None`` otherwise or for torch's own classes (handled exactly by type)."""
    if isinstance(module, _TORCH_NORMS + _BATCHNORMS + _INSTANCENORMS):
        return None
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        return None
    name = type(module).__name__
    if name.endswith("RMSNorm"):
        return "rms"
    if name.endswith("LayerNorm"):
        return "layer"
    return None


def is_feature_norm(module: nn.Module) -> bool:
    """Whether ``module`` normalizes each example's (each token's) features: ``nn.LayerNorm``, ``nn.RMSNorm``, or a
    library ``*LayerNorm``/``*RMSNorm`` class with a weight. Their sigma is one reduction over the feature
    dimensions; BatchNorm's and GroupNorm's need passes over whole conv maps.

    Example:
        >>> is_feature_norm(nn.LayerNorm(4)), is_feature_norm(nn.BatchNorm2d(4))
        (True, False)
    """
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or _library_kind(module) is not None


def _library_eps(module: nn.Module, default: float) -> float:
    for attribute in ("eps", "variance_epsilon"):
        value = getattr(module, attribute, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return default


def library_norm_sigma(
    module: nn.Module, x: torch.Tensor, output: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The sigma a library ``*LayerNorm``/``*RMSNorm`` class divides ``x`` by, shaped ``(N, ..., 1)`` to broadcast
    against ``x``, and the relative error with which ``gamma * x_hat (+ bias)`` reproduces ``output`` (``None``
    without ``output``); ``None`` when ``x`` has no dimensions shaped like the weight.

    The normalized dimensions are the trailing ones shaped like ``weight`` (``(B, T, D)`` with weight ``(D,)``:
    one sigma per token), else dimension 1 (channels-first layouts such as ConvNeXt's ``LayerNorm``). A
    ``*RMSNorm`` uses ``sqrt(mean(x**2) + eps)``. A ``*LayerNorm`` uses ``sqrt(var(x) + eps)`` after subtracting
    the mean, or the root mean square when that is what reproduces ``output`` (``T5LayerNorm``); the choice is
    made on the device, without a host synchronisation.

    Example:
        >>> class T5LayerNorm(nn.Module):  # scale only, no mean subtraction, as in Hugging Face's T5
        ...     def __init__(self, d):
        ...         super().__init__()
        ...         self.weight, self.variance_epsilon = nn.Parameter(torch.ones(d)), 0.0
        ...     def forward(self, x):
        ...         return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        >>> norm, x = T5LayerNorm(2), torch.tensor([[3.0, 5.0]])
        >>> sigma, error = library_norm_sigma(norm, x, norm(x))
        >>> round(float(sigma), 4), float(error) < 1e-6  # sqrt((9 + 25) / 2), not the std 1.0
        (4.1231, True)
    """
    kind = _library_kind(module)
    weight = getattr(module, "weight", None)
    if kind is None or not isinstance(weight, torch.Tensor):
        return None
    x = x.detach().float()
    shape = tuple(weight.shape)
    if x.dim() >= len(shape) and tuple(x.shape[x.dim() - len(shape) :]) == shape:
        dims = tuple(range(x.dim() - len(shape), x.dim()))
        view = shape
    elif len(shape) == 1 and x.dim() >= 2 and x.shape[1] == shape[0]:
        dims = (1,)
        view = (shape[0],) + (1,) * (x.dim() - 2)
    else:
        return None
    eps = _library_eps(module, 1e-6 if kind == "rms" else 1e-5)
    rms = (x.square().mean(dim=dims, keepdim=True) + eps).sqrt()
    if kind == "rms" and output is None:
        return rms, None
    mean = x.mean(dim=dims, keepdim=True)
    std = ((x - mean).square().mean(dim=dims, keepdim=True) + eps).sqrt()
    if output is None:
        return std, None
    gamma = weight.detach().float().reshape(view)
    bias = getattr(module, "bias", None)
    beta = bias.detach().float().reshape(view) if isinstance(bias, torch.Tensor) else 0.0
    y = output.detach().float()
    scale = y.abs().mean().clamp_min(1e-12)
    rms_error = (y - (gamma * x / rms + beta)).abs().mean() / scale
    if kind == "rms":
        return rms, rms_error
    std_error = (y - (gamma * (x - mean) / std + beta)).abs().mean() / scale
    centred = std_error <= rms_error
    return torch.where(centred, std, rms), torch.minimum(std_error, rms_error)


def effective_gain(
    module: nn.Module,
    x: torch.Tensor,
    running: tuple[torch.Tensor, torch.Tensor] | None = None,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
    output: torch.Tensor | None = None,
    diagnostics: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean of ``|gamma| / sigma`` over examples (tokens) and features: the factor ``g / sigma`` by which the
    layer scales (forward and backward) its centred input, eq. 1.10's ``g_l / sigma_l``. ``nan`` for an unknown
    layer type. ``output`` (the layer's output on this forward) settles how a library ``*LayerNorm`` normalizes;
    ``diagnostics`` receives its ``fit_error`` (see :func:`library_norm_sigma`).

    Example:
        >>> ln = nn.LayerNorm(2, eps=0.0)
        >>> with torch.no_grad():
        ...     _ = ln.weight.fill_(3.0)
        >>> float(effective_gain(ln, torch.tensor([[0.0, 2.0], [0.0, 4.0]])))  # mean(3/1, 3/2)
        2.25
    """
    sigma = divisor_std(module, x, running, moments, output, diagnostics)
    if sigma is None:
        return torch.tensor(float("nan"), device=x.device)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return sigma.reciprocal().mean()
    gamma = weight.detach().float().abs()
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or _library_kind(module) is not None:
        # sigma (N, 1, ..., 1) against gamma (normalized_shape): independent, so the mean factorises
        return gamma.mean() * sigma.reciprocal().mean()
    if isinstance(module, _BATCHNORMS):
        return (gamma / sigma).mean()
    return (gamma.unsqueeze(0) / sigma).mean()  # GroupNorm / InstanceNorm: sigma (N, C)


def norm_layer_stats(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    running: tuple[torch.Tensor, torch.Tensor] | None = None,
    diagnostics: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Every statistic of one normalization layer on one forward (see the module docstring for definitions).

    Args:
        module: the normalization layer (its mode decides batch vs running statistics).
        x: its input on this forward.
        y: its output on this forward.
        running: BatchNorm's ``(running_mean, running_var)`` from *before* the forward
            (:func:`snapshot_running_stats` in a forward-pre hook); the module's current buffers when
            ``None``.
        diagnostics: receives a library normalization's ``fit_error`` (:func:`library_norm_sigma`).

    Example:
        >>> bn = nn.BatchNorm1d(2).train()
        >>> x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
        >>> before = snapshot_running_stats(bn)
        >>> stats = norm_layer_stats(bn, x, bn(x), before)
        >>> sorted(stats)  # doctest: +NORMALIZE_WHITESPACE
        ['beta_mean', 'effective_gain', 'gamma_abs_mean', 'in_mean', 'in_std', 'out_mean', 'out_std',
         'running_mean_dist', 'running_std_ratio']
        >>> round(float(stats["running_mean_dist"]), 4)  # batch means 1 and 2 against running mean 0, var 1
        1.5
    """
    xf, yf = x.detach().float(), y.detach().float()
    is_bn = isinstance(module, _BATCHNORMS)
    # computed once: global stats, sigma and running distance (and shared with other callers on this forward)
    moments = _channel_moments(x) if is_bn else None
    stats: dict[str, torch.Tensor] = {}
    stats["in_mean"], stats["in_std"] = _mean_std(xf, moments)
    if is_bn and _uses_batch_stats(module) and not isinstance(module, nn.SyncBatchNorm):  # local = its moments
        stats["out_mean"], stats["out_std"] = _mean_std(yf, _batchnorm_output_moments(module, moments))
    else:
        stats["out_mean"], stats["out_std"] = _mean_std(yf)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(weight, torch.Tensor):
        stats["gamma_abs_mean"] = weight.detach().float().abs().mean()
    if isinstance(bias, torch.Tensor):
        stats["beta_mean"] = bias.detach().float().mean()
    stats["effective_gain"] = effective_gain(module, xf, running, moments, yf, diagnostics)
    if is_bn:
        run = running or snapshot_running_stats(module)
        if run is not None:
            batch_mean, batch_var = moments
            run_mean, run_var = run[0].float(), run[1].float()
            run_std = (run_var + module.eps).sqrt()
            stats["running_mean_dist"] = ((batch_mean - run_mean).abs() / run_std).mean()
            stats["running_std_ratio"] = ((batch_var + module.eps).sqrt() / run_std).mean()
    return stats


def activation_stats(module: nn.Module | None, a: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean, std, saturated fraction and dead-unit fraction of a hidden layer's output ``a`` (see the module
    docstring).

    Example:
        >>> stats = activation_stats(nn.ReLU(), torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 3.0]]))
        >>> round(float(stats["dead_frac"]), 4), "saturated_frac" in stats  # unit 0 never fires
        (0.3333, False)
        >>> float(activation_stats(nn.Tanh(), torch.tensor([[0.995, -0.5]]))["saturated_frac"])
        0.5
    """
    af = a.detach().float()
    stats: dict[str, torch.Tensor] = {}
    stats["act_mean"], stats["act_std"] = _mean_std(af)  # a 0-dim or 1-dim output gets the direct formula
    if isinstance(module, SATURATING_TANH):
        stats["saturated_frac"] = (af.abs() > TANH_SATURATION).float().mean()
    elif isinstance(module, SATURATING_SIGMOID):
        low, high = SIGMOID_SATURATION, 1.0 - SIGMOID_SATURATION
        stats["saturated_frac"] = ((af < low) | (af > high)).float().mean()
    if isinstance(module, RELU_LIKE) and af.dim() >= 2:
        unit_max = af.amax(dim=[0, *range(2, af.dim())])  # per channel, over examples and positions
        stats["dead_frac"] = (unit_max <= 0).float().mean()
    return stats
