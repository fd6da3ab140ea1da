"""Gradient flow through a network's layers: measured from the backward pass and predicted from the weights.

Pure functions and one small stateful class; no Trainer, no hooks.

Measured (from ``dL/dH_l``, the gradient of the loss with respect to hidden layer ``l``'s output, as the
training step's own backward produced it):

* ``grad_norm`` of layer ``l``: the mean over the batch of the per-example L2 norms ``||dL/dH_l[n]||`` (the
  loss is usually a batch mean, so each example's gradient carries a ``1/B`` factor; ratios are unaffected);
* ``backward_gain`` of layer ``l``: ``grad_norm(l - 1) / grad_norm(l)``, the factor by which the gradient
  grows (> 1) or shrinks (< 1) passing back through block ``l``; for the first watched layer there is no ``l -
  1``;
* ``cum_product`` of layer ``l``: the product of the backward gains from the output down to ``l``, which
  telescopes to ``grad_norm(l) / grad_norm(output)``; ``output`` is the output of the network's last weight
  layer (the logits).

Analytic (from the weights, the theory of the backward Jacobian ``prod_i (g_i / sigma_i) W_i``):

* ``spectral_norm`` of each weight layer: ``||W||_2``, by a persistent power iteration
  (:class:`PowerIteration`, one step per call). A conv weight ``(out, in, k, k)`` is taken as the ``(out,
  in*k*k)`` matrix: the operator norm of the convolution itself differs from it (it depends on the input size
  and padding), and this matrix norm is the customary, input-independent proxy;
* ``analytic_gain`` of layer ``l``: ``||W_l||_2 * g_l / sigma_l``, where ``W_l`` is the weight layer feeding
  hidden layer ``l`` and ``g_l / sigma_l`` the effective gain of the normalization between them (1 without
  one). The nonlinearity's derivative is left out, so this is the weights-and-normalization part of the gain;
* ``analytic_cum_product`` of layer ``l``: ``||W_out||_2`` times the product of ``analytic_gain`` over the
  layers above ``l``, the counterpart of ``cum_product``.

The analytic product describes a plain chain ``H_l = Norm(W_l H_{l-1})``. Across a residual block ``h_{l+1} = h_l
+ F(h_l)`` (transformer layers, ResNet blocks) the Jacobian is ``I + dF/dh``: the identity path, which carries
much of the gradient at initialization, is in no weight, so ``prod ||W|| g / sigma`` predicts nothing there and
callers leave it out on models with repeated blocks. What stays meaningful per block:

* ``grad_norm`` of the block's output (the residual stream after block ``l``), its ``backward_gain`` and
  ``cum_product``, measured as above; a sequence output ``(B, T, D)`` has one norm per example over all ``T * D``
  values;
* :func:`module_param_grad_norms`: the norm of the gradients of every parameter inside the block (recursive), the
  quantity Xiong et al. (2020) compare between Post-LN and Pre-LN transformers;
* the effective gains ``g / sigma`` of the normalization layers inside it
  (:func:`lightning_interp.stats.norm_stats.effective_gain`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_interp.layers import (
    WEIGHT_LAYERS,
    called_functionally,
    is_normalization,
    is_weight_layer,
    named_submodules,
)

__all__ = [
    "WEIGHT_LAYERS",
    "per_example_grad_norm",
    "measured_flow",
    "analytic_flow",
    "weight_matrix",
    "PowerIteration",
    "ChainLink",
    "chain_links",
    "param_grad_norms",
    "module_param_grad_norms",
]


def per_example_grad_norm(grad: torch.Tensor) -> torch.Tensor:
    """Mean over the batch (dim 0) of the per-example L2 norms of ``grad``, as a 0-dim float32 tensor.

    Example:
        >>> float(per_example_grad_norm(torch.tensor([[3.0, 4.0], [0.0, 1.0]])))  # norms 5 and 1
        3.0
    """
    g = grad.detach().float()
    if g.dim() == 0:
        return g.abs()
    return g.reshape(g.shape[0], -1).norm(dim=1).mean()


def measured_flow(
    names: Sequence[str], norms: Sequence[float], output_norm: float | None
) -> dict[str, dict[str, float]]:
    """Backward gains and cumulative products from per-layer gradient norms, layers in forward order.

    Args:
        names: hidden layers, input side first.
        norms: their ``grad_norm``.
        output_norm: ``grad_norm`` of the network output; ``None`` makes the last hidden layer the reference.

    Returns:
        ``{layer: {"backward_gain": ..., "cum_product": ...}}``; the first layer has no ``backward_gain``; an
        ``"output"`` entry carries the gain from the output to the last hidden layer.

    Example:
        >>> flow = measured_flow(["a", "b"], [0.01, 0.1], output_norm=1.0)
        >>> flow["a"], flow["output"]
        ({'cum_product': 0.01}, {'backward_gain': 0.1})
        >>> round(flow["b"]["backward_gain"], 6), flow["b"]["cum_product"]
        (0.1, 0.1)
    """
    out: dict[str, dict[str, float]] = {}
    reference = output_norm if output_norm is not None else (norms[-1] if norms else None)
    for i, (name, norm) in enumerate(zip(names, norms)):
        entry: dict[str, float] = {}
        if i > 0:
            entry["backward_gain"] = _ratio(norms[i - 1], norm)
        entry["cum_product"] = _ratio(norm, reference)
        out[name] = entry
    if output_norm is not None and norms:
        out["output"] = {"backward_gain": _ratio(norms[-1], output_norm)}
    return out


def analytic_flow(
    names: Sequence[str], gains: Sequence[float], output_gain: float | None
) -> dict[str, float]:
    """Cumulative analytic products: at layer ``l``, ``output_gain * prod_{j > l} gains[j]``.

    Example:
        >>> analytic_flow(["a", "b", "c"], [5.0, 2.0, 3.0], output_gain=0.5)
        {'a': 3.0, 'b': 1.5, 'c': 0.5}
    """
    running = 1.0 if output_gain is None else float(output_gain)
    out: dict[str, float] = {}
    for name, gain in zip(reversed(names), reversed(gains)):
        out[name] = running
        running *= gain
    return dict(reversed(list(out.items())))


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None:
        return float("nan")
    if b == 0:
        return float("inf") if a > 0 else float("nan")
    return a / b


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """A weight layer's matrix, ``(out, in)``: Linear as stored; conv ``(out, in*k...)`` (the reshaped kernel);
    Hugging Face's ``Conv1D`` (GPT-2's linear layer, ``y = x @ weight + bias``, weight stored ``(in, out)``)
    transposed.

    Example:
        >>> tuple(weight_matrix(nn.Conv2d(3, 8, 5)).shape)
        (8, 75)
        >>> class Conv1D(nn.Module):  # the layout of transformers.pytorch_utils.Conv1D
        ...     def __init__(self, nf, nx):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.zeros(nx, nf))
        >>> tuple(weight_matrix(Conv1D(nf=8, nx=3)).shape)
        (8, 3)
    """
    weight = module.weight.detach()
    if not isinstance(module, WEIGHT_LAYERS) and is_weight_layer(module):  # Conv1D: (in, out)
        return weight.T
    return weight.reshape(weight.shape[0], -1)


class PowerIteration:
    """Persistent power iteration for ``||W||_2`` of several matrices: one step per :meth:`step` call,
    starting from the previous call's singular vector, so the estimate converges over calls and follows
    slowly changing weights. The start vectors come from an own seeded generator (the global RNG is never
    drawn from).

    Example:
        >>> w = torch.diag(torch.tensor([3.0, 1.0, 0.5]))
        >>> power = PowerIteration(seed=0)
        >>> for _ in range(10):
        ...     sigma = power.step("w", w)
        >>> round(float(sigma), 4)
        3.0
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.vectors: dict[str, torch.Tensor] = {}
        self._generator = torch.Generator().manual_seed(seed)

    def __getstate__(self) -> dict[str, Any]:
        # neither a torch.Generator nor its state tensor survives DDP spawn's shared-memory pickling: plain bytes do
        state = dict(self.__dict__)
        state["_generator"] = self._generator.get_state().numpy().tobytes()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state.pop("_generator")), dtype=torch.uint8))
        self.__dict__.update(state, _generator=generator)

    @torch.no_grad()
    def step(self, name: str, matrix: torch.Tensor) -> torch.Tensor:
        """One power-iteration step on ``matrix`` (2-D); returns the current estimate of its spectral norm."""
        w = matrix.detach().float()
        v = self.vectors.get(name)
        if v is None or v.shape[0] != w.shape[1]:
            v = torch.randn(w.shape[1], generator=self._generator).to(w.device)
        v = v.to(w.device)
        u = w @ v
        u = u / u.norm().clamp_min(1e-30)
        v = w.T @ u
        sigma = v.norm()
        self.vectors[name] = v / sigma.clamp_min(1e-30)
        return sigma

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: v.cpu() for name, v in self.vectors.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.vectors = {name: torch.as_tensor(v) for name, v in state.items()}


@dataclass(frozen=True)
class ChainLink:
    """What feeds a hidden layer in a plain chain: its weight layer and the normalization after it (if
    any).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
        ...                     nn.Linear(4 * 6 * 6, 2))
        >>> links, output = chain_links(net, ["2", "missing"])
        >>> links
        [ChainLink(hidden='2', weight='0', norm='1'), ChainLink(hidden='missing', weight=None, norm=None)]
        >>> output
        '4'
    """

    hidden: str
    weight: str | None
    norm: str | None


def chain_links(
    model: nn.Module, hidden: Iterable[str], extra_norm_types: Sequence[type[nn.Module]] = ()
) -> tuple[list[ChainLink], str | None]:
    """Assign weight and normalization layers to hidden layers, by module registration order.

    For each hidden layer, the first weight layer registered after the previous hidden layer, and the first
    normalization registered after that weight layer (before the hidden layer). Also returns the output weight
    layer: the last weight layer registered after the last hidden layer. A plain chain is assumed; residual
    branches (a ResNet's shortcut) are not on the chain and are ignored. Weight layers are recognised by role
    (:func:`~lightning_interp.layers.is_weight_layer`: Hugging Face's ``Conv1D`` too), normalizations likewise;
    a ``nn.MultiheadAttention``'s ``out_proj``, which is applied functionally (its hooks never run), is never
    chosen.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
        ...                     nn.Linear(4, 2))
        >>> links, output = chain_links(net, ["2", "4"])
        >>> [(link.weight, link.norm) for link in links], output
        ([('0', '1'), ('3', None)], '5')
    """
    hidden = list(hidden)
    order = named_submodules(model)
    position = {name: i for i, (name, _) in enumerate(order)}
    functional = called_functionally(model)
    weights = {n for n, m in order if is_weight_layer(m) and n not in functional}
    links: list[ChainLink] = []
    start = 0
    for name in hidden:
        end = position.get(name)
        if end is None:
            links.append(ChainLink(name, None, None))
            continue
        weight = norm = None
        for n, m in order[start:end]:
            if weight is None and n in weights:
                weight = n
            elif weight is not None and norm is None and is_normalization(m, extra_norm_types):
                norm = n
        links.append(ChainLink(name, weight, norm))
        # skip the hidden module's own children (a hidden layer may be a block)
        start = end + 1 + sum(1 for n, _ in order if n.startswith(name + "."))
    last = max((position[n] for n in hidden if n in position), default=-1)
    after = [n for n, _ in order[last + 1 :] if n in weights]
    return links, (after[-1] if after else None)


def param_grad_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    """L2 norm of the gradients of each module's own parameters (weight and bias together), plus ``total``.

    Modules without parameter gradients are left out; every norm is a 0-dim float32 tensor.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 1))
        >>> net(torch.tensor([[3.0, 4.0]])).sum().backward()
        >>> {k: round(float(v), 4) for k, v in param_grad_norms(net).items()}  # sqrt(3**2 + 4**2 + 1**2)
        {'0': 5.099, 'total': 5.099}
    """
    out: dict[str, torch.Tensor] = {}
    squares: list[torch.Tensor] = []
    for name, module in [("", model), *named_submodules(model)]:
        grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
        if not grads:
            continue
        # one fused reduction per gradient (no full-size float copy or squared temporary)
        square = sum(torch.linalg.vector_norm(g.detach(), dtype=torch.float32).square() for g in grads)
        squares.append(square)
        out[name or "model"] = square.sqrt()
    if squares:
        out["total"] = torch.stack(squares).sum().sqrt()
    return out


def module_param_grad_norms(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """L2 norm of the gradients of *all* parameters inside each named module (recursive: a transformer block's
    attention, MLP and norms together), plus ``total`` over the whole model. A parameter shared between modules
    counts once per module and once in ``total``. Modules without parameter gradients are left out; every norm
    is a 0-dim float32 tensor.

    Example:
        >>> net = nn.Sequential(nn.Sequential(nn.Linear(2, 1), nn.Linear(1, 1)), nn.Linear(1, 1))
        >>> with torch.no_grad():
        ...     _ = net[0][1].weight.fill_(1.0)
        >>> net(torch.tensor([[3.0, 4.0]])).sum().backward()
        >>> norms = module_param_grad_norms(net, ["0", "1"])
        >>> sorted(norms), bool(norms["total"] ** 2 - norms["0"] ** 2 - norms["1"] ** 2 < 1e-5)
        (['0', '1', 'total'], True)
    """
    squares: dict[int, torch.Tensor] = {}

    def square(p: nn.Parameter) -> torch.Tensor:
        if id(p) not in squares:  # one fused reduction per gradient, reused by every group holding it
            squares[id(p)] = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32).square()
        return squares[id(p)]

    modules = dict(named_submodules(model))
    out: dict[str, torch.Tensor] = {}
    for name in names:
        module = modules.get(name)
        grads = [square(p) for p in module.parameters() if p.grad is not None] if module is not None else []
        if grads:
            out[name] = torch.stack(grads).sum().sqrt()
    every = [square(p) for p in model.parameters() if p.grad is not None]
    if every:
        out["total"] = torch.stack(every).sum().sqrt()
    return out
