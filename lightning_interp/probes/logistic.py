"""Multinomial logistic regression fitted to convergence on a fixed design matrix, in torch (any device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fit_logistic_regression"]


def fit_logistic_regression(
    features: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    c: float = 1.0,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    max_iter: int = 200,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Minimise ``0.5 ||W||^2 + c * sum_i CE(W x_i + b, y_i)`` (scikit-learn's ``LogisticRegression(C=c)``,
    multinomial, bias not penalised) by full-batch L-BFGS with a strong-Wolfe line search.

    The objective is divided by ``c * n`` so that its scale does not depend on the sample size; it is strictly
    convex, so a warm start (``weight``, ``bias``: the previous solution) changes only how many iterations are
    needed, not the answer. Stops when the largest gradient entry of the scaled objective is below ``tol`` or after
    ``max_iter`` iterations. No autograd: the gradient is written out, so it runs under ``torch.no_grad()`` or
    ``torch.inference_mode()`` too, and the global RNG is never drawn from.

    Args:
        features: ``(n, d)`` design matrix (standardise it first, as scikit-learn users do).
        targets: ``(n,)`` class indices in ``[0, num_classes)``.
        num_classes: number of classes.
        c: inverse regularisation strength (scikit-learn's ``C``).
        weight, bias: starting point, ``(num_classes, d)`` and ``(num_classes,)``; zeros when ``None``.
        max_iter: L-BFGS iterations at most.
        tol: stop at ``max |gradient| <= tol`` of the scaled objective.

    Returns:
        ``(weight, bias, iterations)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(200, 3, generator=g)
        >>> y = (x[:, 0] > 0).long()
        >>> w, b, _ = fit_logistic_regression(x, y, num_classes=2)
        >>> float(((x @ w.T + b).argmax(1) == y).float().mean())
        1.0
    """
    x = features.detach().float()
    n, d = x.shape
    y = F.one_hot(targets.detach().long(), num_classes).to(x.dtype)
    l2 = 1.0 / (c * n)
    w = torch.zeros(num_classes, d, dtype=x.dtype, device=x.device) if weight is None else weight.detach().to(x).clone()
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device) if bias is None else bias.detach().to(x).clone()
    params = torch.cat([w.reshape(-1), b])

    def loss_and_grad(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = flat[: num_classes * d].view(num_classes, d), flat[num_classes * d :]
        logits = torch.addmm(b, x, w.T)
        log_p = logits.log_softmax(1)
        loss = -(y * log_p).sum() / n + 0.5 * l2 * w.square().sum()
        residual = (log_p.exp() - y) / n
        grad_w = residual.T @ x + l2 * w
        return loss, torch.cat([grad_w.reshape(-1), residual.sum(0)])

    return (*_lbfgs(loss_and_grad, params, num_classes, d, max_iter, tol),)


def _lbfgs(loss_and_grad, params, num_classes, d, max_iter, tol, history=10):  # type: ignore[no-untyped-def]
    """L-BFGS with a strong-Wolfe line search (torch's own, fed a closed-form gradient)."""
    from torch.optim.lbfgs import _strong_wolfe

    x = params.clone()
    loss, grad = loss_and_grad(x)
    s_list: list[torch.Tensor] = []
    y_list: list[torch.Tensor] = []
    iterations = 0
    for iterations in range(1, max_iter + 1):
        if float(grad.abs().max()) <= tol:
            iterations -= 1
            break
        # two-loop recursion
        q = -grad
        alphas = []
        for s, yv in zip(reversed(s_list), reversed(y_list)):
            rho = 1.0 / yv.dot(s)
            alpha = rho * s.dot(q)
            q = q - alpha * yv
            alphas.append((rho, alpha))
        if y_list:
            q = q * (s_list[-1].dot(y_list[-1]) / y_list[-1].dot(y_list[-1]))
        for (s, yv), (rho, alpha) in zip(zip(s_list, y_list), reversed(alphas)):
            q = q + s * (alpha - rho * yv.dot(q))
        direction = q
        gtd = grad.dot(direction)
        if gtd > -1e-12:  # not a descent direction (rounding): restart from the gradient
            s_list.clear()
            y_list.clear()
            direction, gtd = -grad, -grad.dot(grad)
        step = 1.0 if s_list else min(1.0, 1.0 / float(grad.abs().sum()))

        def evaluate(x0: torch.Tensor, t: float, dvec: torch.Tensor) -> tuple[float, torch.Tensor]:
            value, g = loss_and_grad(x0 + t * dvec)
            return float(value), g

        new_loss, new_grad, step, _ = _strong_wolfe(evaluate, x, step, direction, float(loss), grad, gtd)
        s = step * direction
        yv = new_grad - grad
        if float(yv.dot(s)) > 1e-10:
            s_list.append(s)
            y_list.append(yv)
            if len(s_list) > history:
                s_list.pop(0)
                y_list.pop(0)
        x = x + s
        if abs(float(loss) - new_loss) < 1e-12 * max(1.0, abs(new_loss)):
            loss, grad = torch.as_tensor(new_loss), new_grad
            break
        loss, grad = torch.as_tensor(new_loss), new_grad
    w = x[: num_classes * d].view(num_classes, d).clone()
    b = x[num_classes * d :].clone()
    return w, b, iterations
