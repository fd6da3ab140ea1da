"""Representer point selection (Yeh, Kim, Yen & Ravikumar, NeurIPS 2018) with an exact refit.

The last linear layer ``W`` (features ``f`` with a column of ones for the bias) is refit with an L2 penalty to
targets ``p`` (the model's own softmax outputs, or one-hot labels)::

    J(W) = (1/n) sum_i CE(softmax(W f_i), p_i) + lam ||W||^2

At the optimum ``W = sum_i alpha_i f_i^T`` with ``alpha_i = -(1/(2 lam n)) dL/dz_i = (p_i - q_i) / (2 lam n)``
(``q_i`` the refit's probabilities), so the refit logits decompose over training points:
``z(f_t) = sum_i alpha_i (f_i . f_t + 1)``. The representer value of training point ``i`` for test point ``t`` and
class ``c`` is ``alpha_ic (f_i . f_t + 1)``: positive = proponent, negative = opponent.

How far the decomposition is from exact is known in closed form: ``W - alpha^T F = grad J / (2 lam)``, so the
error at ``f_t`` is ``grad J . f_t / (2 lam)``. The reference implementations stop gradient descent loosely and
are 1-5% off; :func:`fit_representer` runs a preconditioned Newton-CG in float64 to ``max |grad J| <= tol`` (1e-9),
which makes the decomposition exact to about 1e-7 in a fraction of their time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from lightning_interp._validation import check_choice, check_positive_float, check_positive_int
from lightning_interp.errors import LightningInterpError

__all__ = [
    "RepresenterFit",
    "RepresenterTopK",
    "SuspectRanking",
    "fit_representer",
    "suspect_labels",
]

# Memory budget of one chunk of the (test x train) similarity matrix in values()/top_k(): a few such blocks live
# at once, so the extra memory stays well under 500 MB at 50k training points whatever the number of test points.
_CHUNK_BYTES = 64 * 2**20


class RepresenterTopK(NamedTuple):
    """The ``k`` strongest proponents (largest positive values) and opponents (most negative values) per test
    point; each tensor is ``(m, k)``, strongest first. Indices are rows of the training features.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> f = torch.randn(100, 4, generator=g)
        >>> fit = fit_representer(f, torch.softmax(2 * f[:, :3], dim=1), lam=0.01)
        >>> test = torch.randn(2, 4, generator=g)
        >>> top = fit.top_k(test, k=3, classes=0)
        >>> top.proponent_indices.shape, top.opponent_values.shape
        (torch.Size([2, 3]), torch.Size([2, 3]))
        >>> bool((top.proponent_values > 0).all()), bool((top.opponent_values < 0).all())
        (True, True)
        >>> values = fit.values(test, classes=0)  # the full (m, n) matrix that top_k never builds
        >>> bool(torch.equal(top.proponent_indices, values.topk(3, dim=1).indices))
        True
        >>> bool(torch.equal(top.opponent_values, values.topk(3, dim=1, largest=False).values))
        True
    """

    proponent_indices: torch.Tensor
    proponent_values: torch.Tensor
    opponent_indices: torch.Tensor
    opponent_values: torch.Tensor


class SuspectRanking(NamedTuple):
    """Training examples ranked from most to least suspect: ``indices`` (k,), ``scores`` (k,) and the rule.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])  # the model's softmax outputs
        >>> ranking = suspect_labels(torch.zeros(3, 1), torch.tensor([0, 0, 1]), rule="loss", probs=probs)
        >>> ranking.indices.tolist(), ranking.rule
        ([1, 2, 0], 'loss')
        >>> [round(score, 3) for score in ranking.scores.tolist()]  # -log p(given label): -log 0.2, ...
        [1.609, 0.916, 0.105]
    """

    indices: torch.Tensor
    scores: torch.Tensor
    rule: str


def _augment(features: torch.Tensor, bias: bool) -> torch.Tensor:
    features = features.detach()
    if features.dim() != 2:
        features = features.reshape(features.shape[0], -1)
    if not bias:
        return features.to(torch.float64)
    # one float64 copy with the ones column, rather than a conversion and then a concatenation
    out = features.new_empty(features.shape[0], features.shape[1] + 1, dtype=torch.float64)
    out[:, :-1] = features
    out[:, -1] = 1
    return out


@dataclass
class RepresenterFit:
    """The result of :func:`fit_representer`: global weights ``alpha`` and the refit head.

    Attributes:
        alpha: ``(n, c)`` float64 global importance of every training point for every class.
        weight: ``(c, d)`` float64 refit weight (without the bias column).
        bias: ``(c,)`` refit bias, or ``None`` when fit with ``bias=False``.
        features: ``(n, d + bias)`` float64 training features as used in the fit (ones column included).
        lam: the L2 penalty.
        stationarity: ``max |grad J|`` at the returned weight (0 at the exact optimum).
        iterations: Newton iterations taken.
        converged: whether ``stationarity <= tol`` was reached.
        decomposition_residual: ``max |z_i - sum_j alpha_j (f_j . f_i + 1)| / max |z_i|`` over the training points
            (relative; what the representer decomposition misses because the optimum is not exact).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> f = torch.randn(100, 4, generator=g)
        >>> fit = fit_representer(f, torch.softmax(2 * f[:, :3], dim=1), lam=0.01)
        >>> fit.alpha.shape, fit.weight.shape, fit.bias.shape, fit.features.shape  # ones column appended
        (torch.Size([100, 3]), torch.Size([3, 4]), torch.Size([3]), torch.Size([100, 5]))
        >>> fit.converged, fit.stationarity <= 1e-9, fit.decomposition_residual < 1e-6
        (True, True, True)
        >>> float(fit.alpha.sum(dim=1).abs().max()) < 1e-12  # alpha_i = (p_i - q_i) / (2 lam n) sums to 0
        True
        >>> test = torch.randn(2, 4, generator=g)
        >>> bool(torch.allclose(fit.decomposed_logits(test), fit.logits(test), atol=1e-7))
        True
    """

    alpha: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    features: torch.Tensor
    lam: float
    stationarity: float
    iterations: int
    converged: bool
    decomposition_residual: float = field(default=float("nan"))

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    @property
    def num_classes(self) -> int:
        return self.alpha.shape[1]

    def _weight_aug(self) -> torch.Tensor:
        return torch.cat([self.weight, self.bias[:, None]], dim=1) if self.bias is not None else self.weight

    def _test(self, test_features: torch.Tensor) -> torch.Tensor:
        test = _augment(test_features, self.has_bias).to(self.features.device)
        if test.shape[1] != self.features.shape[1]:
            raise LightningInterpError(
                f"Expected argument `test_features` to have {self.features.shape[1] - self.has_bias} features like "
                f"the training features, but got shape {tuple(test_features.shape)}."
            )
        return test

    def logits(self, test_features: torch.Tensor) -> torch.Tensor:
        """Refit logits ``W f_t + b``, ``(m, c)`` float64."""
        return self._test(test_features) @ self._weight_aug().T

    def decomposed_logits(self, test_features: torch.Tensor) -> torch.Tensor:
        """``sum_i alpha_i (f_i . f_t + 1)``, ``(m, c)`` float64: equals :meth:`logits` up to the residual."""
        test = self._test(test_features)
        return test @ (self.alpha.T @ self.features).T

    def _chunk_rows(self) -> int:
        return max(1, _CHUNK_BYTES // (8 * max(1, self.features.shape[0])))

    def _classes(self, test: torch.Tensor, classes: torch.Tensor | int | None) -> torch.Tensor:
        if classes is None:
            return (test @ self._weight_aug().T).argmax(dim=1)
        classes = torch.as_tensor(classes, device=test.device).long().reshape(-1)
        if classes.numel() == 1:
            classes = classes.expand(test.shape[0])
        if classes.numel() != test.shape[0] or (classes < 0).any() or (classes >= self.num_classes).any():
            raise LightningInterpError(
                f"Expected argument `classes` to hold one class in [0, {self.num_classes}) per test point "
                f"({test.shape[0]}), but got {classes.tolist()[:10]}."
            )
        return classes

    def _blocks(self, test_features: torch.Tensor, classes: torch.Tensor | int | None):  # type: ignore[no-untyped-def]
        test = self._test(test_features)
        cls = self._classes(test, classes)
        rows = self._chunk_rows()
        for start in range(0, test.shape[0], rows):
            block = test[start : start + rows]
            # (rows, n): alpha_{i, c_t} (f_i . f_t + 1), built one chunk of test points at a time
            yield start, (block @ self.features.T).mul_(self.alpha[:, cls[start : start + rows]].T)

    def values(self, test_features: torch.Tensor, classes: torch.Tensor | int | None = None) -> torch.Tensor:
        """Representer values ``alpha_{i c_t} (f_i . f_t + 1)`` as an ``(m, n)`` float64 matrix.

        Args:
            test_features: ``(m, d)`` features of the test points.
            classes: the class explained for each test point (an int for all, or ``(m,)``); default: the refit's
                prediction. Each row sums to the test point's decomposed logit of that class.
        """
        out = []
        for _, block in self._blocks(test_features, classes):
            out.append(block)
        return torch.cat(out) if out else self.features.new_zeros(0, self.features.shape[0])

    def top_k(
        self, test_features: torch.Tensor, k: int = 5, classes: torch.Tensor | int | None = None
    ) -> RepresenterTopK:
        """The ``k`` strongest proponents and opponents of each test point, in bounded memory (chunks of test
        points; the full ``(m, n)`` matrix is never built). ``classes`` as in :meth:`values`."""
        k = min(check_positive_int("k", k), self.features.shape[0])
        parts: list[tuple[torch.Tensor, ...]] = []
        for _, block in self._blocks(test_features, classes):
            pro = block.topk(k, dim=1)
            con = block.topk(k, dim=1, largest=False)
            parts.append((pro.indices, pro.values, con.indices, con.values))
        if not parts:
            empty = torch.zeros(0, k)
            return RepresenterTopK(empty.long(), empty.double(), empty.long(), empty.double())
        return RepresenterTopK(*(torch.cat([p[j] for p in parts]) for j in range(4)))


# ---- the refit ---------------------------------------------------------------------------------------------------
class _Problem:
    """``J(W) = (1/n) sum_i CE(softmax(W f_i), p_i) + lam ||W||^2`` with its gradient and Hessian-vector products."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, lam: float) -> None:
        self.f = features
        self.p_t = targets.T.contiguous()
        self.lam = lam
        self.n = features.shape[0]
        # Hessian-vector products only steer the CG direction (solved to a relative 1e-4 at best), so float32
        # suffices there and halves their cost; the gradient, which decides convergence, stays float64. Stored
        # (d, n): with c ~ 10 classes MKL runs (c, d) @ (d, n) and (c, n) @ (n, d) 1.3-3x faster than
        # (n, d) @ (d, c), from digits (1,437 x 65) to 50,000 x 513
        self.f32_t = torch.empty(features.shape[::-1], dtype=torch.float32, device=features.device)
        self.f32_t.copy_(features.T)

    def evaluate(self, w: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Loss, gradient and the ``(c, n)`` probabilities at ``w``. Logits are laid out ``(c, n)``: a softmax
        over the short first dimension runs 2x faster than over a short last one."""
        log_q = torch.log_softmax(w @ self.f.T, dim=0)
        loss = -(self.p_t * log_q).sum() / self.n + self.lam * (w * w).sum()
        q = log_q.exp_()
        grad = torch.addmm(w, q - self.p_t, self.f, beta=2 * self.lam, alpha=1 / self.n)
        return float(loss), grad, q

    def hvp(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``H v`` in float32, with ``q`` the ``(c, n)`` float32 probabilities at the current point."""
        qzv = q * (v @ self.f32_t)
        r = torch.addcmul(qzv, q, qzv.sum(dim=0, keepdim=True), value=-1)
        return torch.addmm(v, r, self.f32_t.T, beta=2 * self.lam, alpha=1 / self.n)

    def diagonal(self, q: torch.Tensor) -> torch.Tensor:
        """Diagonal of the Hessian (Jacobi preconditioner), in chunks so that ``f**2`` is never stored whole."""
        out = torch.full((q.shape[0], self.f32_t.shape[0]), 2 * self.lam, dtype=torch.float32, device=q.device)
        cols = max(1, _CHUNK_BYTES // (4 * self.f32_t.shape[0]))
        for s in range(0, self.n, cols):
            qs = q[:, s : s + cols]
            out.addmm_(qs * (1 - qs), self.f32_t[:, s : s + cols].square().T, alpha=1 / self.n)
        return out


def _conjugate_gradient(
    problem: _Problem,
    q: torch.Tensor,
    grad: torch.Tensor,
    precond: torch.Tensor,
    rtol: float,
    atol: float,
    max_iter: int,
) -> tuple[torch.Tensor, int]:
    """Approximately solve ``H s = -grad`` by preconditioned CG until ``max |residual| <= max(rtol max |grad|,
    atol)``: the max-norm of the stopping rule, since the new gradient is about the residual. In float32 like
    the Hessian-vector products; the float64 gradient outside decides convergence. At small sizes each step
    costs a few dozen microseconds of per-operation overhead, so the loop keeps to one fused operation per update
    and one scalar read per reduction."""
    r = -grad.float()
    s = torch.zeros_like(r)
    z = r / precond
    d = z.clone()
    rz = float(torch.vdot(r.view(-1), z.view(-1)))
    target = max(rtol * float(grad.abs().max()), atol)
    steps = 0
    for steps in range(1, max_iter + 1):
        hd = problem.hvp(q, d)
        curvature = float(torch.vdot(d.view(-1), hd.view(-1)))
        if curvature <= 0:  # cannot happen for lam > 0 apart from rounding; keep what we have
            break
        step = rz / curvature
        s.add_(d, alpha=step)
        r.sub_(hd, alpha=step)
        if float(torch.linalg.vector_norm(r, float("inf"))) <= target:
            break
        z = r / precond
        rz_new = float(torch.vdot(r.view(-1), z.view(-1)))
        torch.add(z, d, alpha=rz_new / rz, out=d)
        rz = rz_new
    return s.double(), steps


def fit_representer(
    features: torch.Tensor,
    target_probs: torch.Tensor,
    lam: float = 0.003,
    bias: bool = True,
    tol: float = 1e-9,
    max_iter: int = 100,
    init_weight: torch.Tensor | None = None,
    init_bias: torch.Tensor | None = None,
) -> RepresenterFit:
    """Refit a softmax head with L2 penalty ``lam`` to ``target_probs`` and return the representer weights.

    Newton-CG (float64 objective and gradient; the Jacobi-preconditioned conjugate gradient, which only steers the
    search direction, in float32, with an adaptive forcing term; Armijo backtracking), stopped
    at ``max |grad J| <= tol``. The objective is strictly convex, so the optimum is unique and the start only
    changes the time taken. If float64 rounding stops progress first, ``converged`` is False and ``stationarity``
    says how close it got.

    Args:
        features: ``(n, d)`` inputs of the final linear layer (any float dtype; flattened when not 2-D).
        target_probs: ``(n, c)`` rows on the probability simplex: the model's softmax outputs (the paper) or one-hot
            labels (:func:`suspect_labels`).
        lam: L2 penalty ``lambda`` (the paper's 0.003).
        bias: append a column of ones (the bias is then part of ``W``, penalised, and of the decomposition).
        tol: stop when ``max |grad J| <= tol``.
        max_iter: at most this many Newton iterations.
        init_weight: ``(c, d)`` start (the trained head's weight, or ``(c, d + 1)`` with the bias column); zeros
            when ``None``.
        init_bias: ``(c,)`` start of the bias when ``init_weight`` is ``(c, d)``.

    Returns:
        A :class:`RepresenterFit`.

    Raises:
        LightningInterpError: bad shapes, non-finite values, targets that are not probabilities, ``lam <= 0``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> f = torch.randn(200, 5, generator=g)
        >>> p = torch.softmax(f[:, :3] * 2, dim=1)
        >>> fit = fit_representer(f, p, lam=0.01)
        >>> fit.converged, fit.alpha.shape
        (True, torch.Size([200, 3]))
        >>> test = torch.randn(4, 5, generator=g)
        >>> bool(torch.allclose(fit.values(test, classes=1).sum(1), fit.logits(test)[:, 1], atol=1e-7))
        True
    """
    lam = check_positive_float("lam", lam)
    tol = check_positive_float("tol", tol)
    max_iter = check_positive_int("max_iter", max_iter)
    if not isinstance(features, torch.Tensor) or features.dim() < 2 or features.shape[0] == 0:
        raise LightningInterpError(
            "Expected argument `features` to be a tensor of shape (n, d) with n >= 1, but got "
            f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}."
        )
    f = _augment(features, bias)
    p = torch.as_tensor(target_probs).detach().to(dtype=torch.float64, device=f.device)
    if p.dim() != 2 or p.shape[0] != f.shape[0] or p.shape[1] < 2:
        raise LightningInterpError(
            f"Expected argument `target_probs` to have shape (n={f.shape[0]}, c >= 2), but got {tuple(p.shape)}."
        )
    # a sum is finite only if every term is (one reduction, where isfinite().all() costs 10x more); when it is
    # not, the full check tells an overflowing sum from real NaN/Inf values
    if not math.isfinite(float(f.sum())) and not bool(torch.isfinite(f).all()):
        raise LightningInterpError(
            "Expected argument `features` to be finite, but it holds NaN or Inf values."
        )
    row_sums = p.sum(1)
    if (
        not math.isfinite(float(row_sums.sum()))
        or float(p.min()) < -1e-6
        or float((row_sums - 1).abs().max()) > 1e-4
    ):
        raise LightningInterpError(
            "Expected argument `target_probs` to hold probability rows (non-negative, summing to 1), e.g. "
            "softmax outputs or one-hot labels; apply softmax to logits first."
        )
    # rows summing to 1 exactly: float32 softmax outputs are off by ~1e-7, which would bias alpha by as much
    p = p.clamp_min(0)
    p = p / p.sum(1, keepdim=True)
    n, dim = f.shape
    c = p.shape[1]
    w = torch.zeros(c, dim, dtype=torch.float64, device=f.device)
    if init_weight is not None:
        init = init_weight.detach().to(torch.float64).to(f.device)
        if init.shape == (c, dim):
            w = init.clone()
        elif bias and init.shape == (c, dim - 1):
            w[:, :-1] = init
            if init_bias is not None:
                w[:, -1] = init_bias.detach().to(torch.float64).to(f.device).reshape(c)
        else:
            raise LightningInterpError(
                f"Expected argument `init_weight` to have shape ({c}, {dim - bias}) (or ({c}, {dim}) with the bias "
                f"column), but got {tuple(init.shape)}."
            )
    problem = _Problem(f, p, lam)
    loss, grad, q = problem.evaluate(w)
    gmax = float(grad.abs().max())
    iterations = 0
    stalled = 0
    for iterations in range(1, max_iter + 1):
        if gmax <= tol:
            iterations -= 1
            break
        gnorm = float(grad.norm())
        # superlinear forcing term: loose solves far away, tight ones near the optimum; but never tighter than
        # needed to land within tol / 10, which only saves the last solve's overshoot (to 1e-13 and below)
        rtol = min(0.5, math.sqrt(gnorm))
        q32 = q.float()
        step, _ = _conjugate_gradient(
            problem, q32, grad, problem.diagonal(q32), rtol, 0.1 * tol, max_iter=max(50, 2 * dim * c)
        )
        slope = float((grad * step).sum())
        t = 1.0
        accepted = False
        for _ in range(40):
            trial = w + t * step
            loss_t, grad_t, q_t = problem.evaluate(trial)
            gmax_t = float(grad_t.abs().max())
            # Armijo; near the optimum the loss difference drowns in rounding, so a smaller gradient also counts
            rounding = 1e-13 * max(1.0, abs(loss))
            if loss_t <= loss + 1e-4 * t * slope or (loss_t <= loss + rounding and gmax_t < gmax):
                accepted = True
                break
            t *= 0.5
        if not accepted:
            break
        stalled = stalled + 1 if gmax_t >= 0.9 * gmax else 0
        w, loss, grad, q, gmax = trial, loss_t, grad_t, q_t, gmax_t
        if stalled >= 5:  # float64 floor reached: further steps only shuffle rounding errors
            break
    alpha = (p - q.T).contiguous() / (2 * lam * n)
    weight, bias_vec = (w[:, :-1], w[:, -1]) if bias else (w, None)
    fit = RepresenterFit(
        alpha=alpha,
        weight=weight.clone(),
        bias=None if bias_vec is None else bias_vec.clone(),
        features=f,
        lam=lam,
        stationarity=gmax,
        iterations=iterations,
        converged=gmax <= tol,
    )
    # the logits W F^T and what the decomposition misses, (W - alpha^T F) F^T, in one product
    both = torch.cat([w, w - alpha.T @ f]) @ f.T
    z, missed = both[:c], both[c:]
    fit.decomposition_residual = float(missed.abs().max() / z.abs().max().clamp_min(1e-300))
    return fit


# ---- suspect labels ------------------------------------------------------------------------------------------------
def suspect_labels(
    features: torch.Tensor,
    labels: torch.Tensor,
    lam: float = 0.003,
    k: int | None = None,
    rule: Literal["label_refit", "loss", "trustai"] = "label_refit",
    probs: torch.Tensor | None = None,
    num_classes: int | None = None,
    fit: RepresenterFit | None = None,
) -> SuspectRanking:
    """Training examples whose given label looks wrong, most suspect first.

    Rules:

    * ``"label_refit"`` (default): refit the head to the *given* one-hot labels and rank by ``alpha`` at the
      labelled class, ``(1 - q_{i, y_i}) / (2 lam n)``: how much the regularised linear head has to be pulled
      towards each given label. On digits with 5% flipped labels it finds 82-86% of the flips in its top k
      (k = number flipped).
    * ``"loss"``: the model's own cross-entropy ``-log p_{i, y_i}`` (needs ``probs``); 66-84% there.
    * ``"trustai"``: TrustAI's dirty-data rule, offered for comparison only: refit to the model's probabilities
      (``probs``) and rank by (number of positive alphas, sum of positive alphas); 7-40% there. It ignores the
      given labels entirely.

    Args:
        features: ``(n, d)`` inputs of the final linear layer.
        labels: ``(n,)`` given integer labels.
        lam: L2 penalty of the refit.
        k: how many to return (all ``n`` when ``None``).
        rule: ``"label_refit"``, ``"loss"`` or ``"trustai"``.
        probs: ``(n, c)`` model softmax outputs (needed by ``"loss"`` and ``"trustai"``).
        num_classes: number of classes (default: ``probs.shape[1]``, else ``labels.max() + 1``).
        fit: for ``"trustai"``, an existing refit to ``probs`` to reuse.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(300) % 3
        >>> f = torch.randn(300, 4, generator=g) + 6 * F.one_hot(y, 4).double()
        >>> noisy = y.clone(); noisy[:6] = (y[:6] + 1) % 3
        >>> sorted(suspect_labels(f, noisy, k=6).indices.tolist())
        [0, 1, 2, 3, 4, 5]
    """
    rule = check_choice("rule", rule, ("label_refit", "loss", "trustai"))
    labels = torch.as_tensor(labels).reshape(-1).long()
    if labels.shape[0] != features.shape[0]:
        raise LightningInterpError(
            f"Expected argument `labels` to hold one label per feature row ({features.shape[0]}), but got "
            f"{labels.shape[0]}."
        )
    if num_classes is None:
        num_classes = probs.shape[1] if probs is not None else int(labels.max()) + 1
    if (labels < 0).any() or (labels >= num_classes).any():
        raise LightningInterpError(
            f"Expected argument `labels` to lie in [0, {num_classes}), but got [{int(labels.min())}, "
            f"{int(labels.max())}]; pass the right `num_classes=`."
        )
    if rule != "label_refit" and probs is None and not (rule == "trustai" and fit is not None):
        raise LightningInterpError(
            f"Expected argument `probs` (the model's softmax outputs) for rule={rule!r}, but got None."
        )
    n = labels.shape[0]
    k = n if k is None else min(check_positive_int("k", k), n)
    if rule == "label_refit":
        one_hot = F.one_hot(labels, num_classes).to(torch.float64)
        refit = fit_representer(features, one_hot, lam=lam)
        scores = refit.alpha.gather(1, labels.to(refit.alpha.device)[:, None])[:, 0]
    elif rule == "loss":
        p = torch.as_tensor(probs).detach().to(torch.float64)
        scores = -p.gather(1, labels.to(p.device)[:, None])[:, 0].clamp_min(1e-300).log()
    else:
        refit = fit if fit is not None else fit_representer(features, probs, lam=lam)
        positive = refit.alpha.clamp_min(0)
        count = (refit.alpha > 0).sum(1).to(torch.float64)
        # lexicographic (count, sum): the sum term is scaled into [0, 0.5], so it only breaks ties of the count
        total = positive.sum(1)
        scores = count + total / (total.max().clamp_min(1e-300) * 2)
    order = scores.argsort(descending=True, stable=True)[:k]
    return SuspectRanking(order.cpu(), scores[order].cpu(), rule)
