"""Many linear probes, one per layer: fitted to convergence on frozen features, or trained online step by step."""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.nn.functional as F

from lightning_interp._distributed import all_reduce_, world_size
from lightning_interp.probes.linear_probe import LinearProbe
from lightning_interp.probes.logistic import fit_logistic_regression

__all__ = ["ProbeBank"]

Prediction = tuple[torch.Tensor, torch.Tensor]  # (predicted classes (B,), whether the layer's values were finite)


class ProbeBank:
    """One :class:`LinearProbe` per layer.

    Two ways to train them:

    * :meth:`fit`: on a fixed sample of frozen activations, to convergence (multinomial logistic regression with
      scikit-learn's ``C``, on features standardised with the sample's own moments), warm-started from the
      previous solution;
    * :meth:`train_step`: online, one Adam step of every probe per batch. The step never synchronises with the
      host (no ``.item()``, no ``bool(tensor)``): a layer whose activations are not finite on a step, and rows
      whose targets are not valid class indices, are masked out of the update instead of being tested for on the
      host. Adam is written out here so that a masked layer's step leaves its weights, moments and step count
      exactly as they were.

    Probes appear lazily (created the first time their layer is seen, seeded by ``seed`` and the layer name,
    independent of the global RNG). Under ``torch.distributed`` the online feature moments, the skip decisions and
    the gradients are averaged across ranks, so every replica stays identical; :meth:`fit` expects every rank to
    pass the same (gathered) sample.

    Example:
        >>> bank = ProbeBank(num_classes=3, lr=0.1)
        >>> x = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
        >>> y = x[:, :3].argmax(1)  # a linearly separable rule
        >>> for _ in range(50):
        ...     _ = bank.train_step({"layer": x}, y)
        >>> predicted, finite = bank.predict({"layer": x})["layer"]
        >>> (predicted == y).float().mean().item() > 0.9, bool(finite)
        (True, True)
        >>> _ = bank.fit("frozen", x, y)
        >>> (bank.predict({"frozen": x})["frozen"][0] == y).float().mean().item() > 0.95
        True
    """

    def __init__(
        self, num_classes: int, lr: float = 1e-2, seed: int = 0, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:  # fmt: skip
        self.num_classes = num_classes
        self.lr = lr
        self.seed = seed
        self.betas = betas
        self.eps = eps
        self.probes: dict[str, LinearProbe] = {}
        self.moments: dict[str, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.probes)

    def ensure(self, name: str, in_features: int, device: torch.device | str = "cpu") -> LinearProbe:
        """The probe of ``name``, created on first use."""
        probe = self.probes.get(name)
        if probe is None:
            probe = LinearProbe(in_features, self.num_classes, seed=self.seed + zlib.crc32(name.encode())).to(device)
            self.probes[name] = probe
        return probe

    def to(self, device: torch.device | str) -> ProbeBank:
        for probe in self.probes.values():
            probe.to(device)
        self.moments = {name: {k: v.to(device) for k, v in state.items()} for name, state in self.moments.items()}
        return self

    # ---- prediction --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, activations: dict[str, torch.Tensor]) -> dict[str, Prediction]:
        """Predicted classes of every layer that has a probe, with a 0-dim bool tensor saying whether the layer's
        activations were finite (the predictions of a non-finite layer are meaningless: mask them out)."""
        out = {}
        for name, x in activations.items():
            if name in self.probes:
                finite = torch.isfinite(x).all()
                out[name] = (self.probes[name](torch.where(finite, x, 0.0)).argmax(1), finite)
        return out

    # ---- fitting on frozen features ----------------------------------------------------------------------------
    def fit(
        self, name: str, features: torch.Tensor, targets: torch.Tensor, c: float = 1.0, max_iter: int = 1000,
        tol: float = 1e-4,
    ) -> int:  # fmt: skip
        """Fit the probe of ``name`` to convergence on ``features`` ``(n, d)`` and class indices ``targets``:
        standardisation from the sample's moments, then :func:`~lightning_interp.probes.logistic.fit_logistic_regression`
        from the probe's current weights. Rows with non-finite values must be dropped by the caller. Returns the
        number of L-BFGS iterations."""
        probe = self.ensure(name, features.shape[1], features.device)
        features = features.to(probe.running_mean.device)
        probe.set_statistics(features)
        weight, bias, iterations = fit_logistic_regression(
            probe.standardize(features), targets.to(features.device), self.num_classes, c=c,
            weight=probe.linear.weight, bias=probe.linear.bias, max_iter=max_iter, tol=tol,
        )  # fmt: skip
        with torch.no_grad():
            probe.linear.weight.copy_(weight)
            probe.linear.bias.copy_(bias)
        return iterations

    # ---- online training ---------------------------------------------------------------------------------------
    def train_step(self, activations: dict[str, torch.Tensor], targets: torch.Tensor) -> dict[str, Prediction]:
        """One Adam step of every probe on ``activations`` (``{layer: (B, F)}``), without a host synchronisation.

        Returns, per layer, the predictions made *before* the step (an honest online training accuracy) and
        whether the layer took part (its activations were finite on every rank). Rows whose targets are outside
        ``[0, num_classes)`` do not count in the loss."""
        names = sorted(activations)
        if not names:
            return {}
        device = activations[names[0]].device
        targets = targets.to(device)
        valid = (targets >= 0) & (targets < self.num_classes)
        safe_targets = targets.clamp(0, self.num_classes - 1)
        rows = valid.to(torch.float32)
        finite = torch.stack([torch.isfinite(activations[n]).all() for n in names]).to(torch.float32)
        if world_size() > 1:
            finite = all_reduce_(finite, "min")
        keep = {n: finite[i] > 0 for i, n in enumerate(names)}
        clean = {n: torch.where(keep[n], activations[n], 0.0) for n in names}
        for name in names:
            self.ensure(name, clean[name].shape[1], device)
        self._update_statistics(clean, keep)
        predictions: dict[str, Prediction] = {}
        params: list[torch.Tensor] = []
        with torch.enable_grad():
            loss = torch.zeros((), device=device)
            for name in names:
                logits = self.probes[name](clean[name])
                predictions[name] = (logits.detach().argmax(1), keep[name])
                per_row = F.cross_entropy(logits, safe_targets, reduction="none") * rows
                loss = loss + keep[name].to(loss.dtype) * per_row.sum() / rows.sum().clamp_min(1.0)
                params += list(self.probes[name].linear.parameters())
            grads = torch.autograd.grad(loss, params)
        grads = self._sync_gradients(list(grads))
        offset = 0
        for name in names:
            self._adam_step(name, grads[offset : offset + 2], keep[name])
            offset += 2
        return predictions

    @torch.no_grad()
    def _adam_step(self, name: str, grads: list[torch.Tensor], keep: torch.Tensor) -> None:
        """Adam (bias-corrected, as ``torch.optim.Adam``) on one probe's weight and bias; ``keep`` False leaves
        weights, moments and the step count untouched."""
        probe = self.probes[name]
        params = [probe.linear.weight, probe.linear.bias]
        state = self.moments.get(name)
        if state is None:
            state = {"step": torch.zeros((), device=params[0].device)}
            for i, p in enumerate(params):
                state[f"exp_avg{i}"] = torch.zeros_like(p)
                state[f"exp_avg_sq{i}"] = torch.zeros_like(p)
            self.moments[name] = state
        beta1, beta2 = self.betas
        weight = keep.to(params[0].dtype)
        state["step"] += weight
        step = state["step"].clamp_min(1.0)
        correction1, correction2 = 1 - beta1**step, 1 - beta2**step
        for i, (p, g) in enumerate(zip(params, grads)):
            exp_avg, exp_avg_sq = state[f"exp_avg{i}"], state[f"exp_avg_sq{i}"]
            exp_avg.lerp_(g, (1 - beta1) * weight)
            exp_avg_sq.lerp_(g * g, (1 - beta2) * weight)
            update = (exp_avg / correction1) / ((exp_avg_sq / correction2).sqrt() + self.eps)
            p.sub_(update * (self.lr * weight))

    def _update_statistics(self, usable: dict[str, torch.Tensor], keep: dict[str, torch.Tensor]) -> None:
        names = list(usable)
        if world_size() == 1:
            for name in names:
                self.probes[name].update_statistics(usable[name], keep=keep[name])
            return
        # average first and second moments across ranks in one collective, then derive the variance
        moments = torch.cat([torch.cat([usable[n].mean(0), usable[n].pow(2).mean(0)]) for n in names])
        all_reduce_(moments, "mean")
        offset = 0
        for name in names:
            width = usable[name].shape[1]
            mean, sq = moments[offset : offset + width], moments[offset + width : offset + 2 * width]
            self.probes[name].update_statistics(mean, (sq - mean.pow(2)).clamp_min(0), keep=keep[name])
            offset += 2 * width

    @staticmethod
    def _sync_gradients(grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if world_size() == 1:
            return grads
        flat = torch.cat([g.reshape(-1) for g in grads])
        all_reduce_(flat, "mean")
        out, offset = [], 0
        for g in grads:
            out.append(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return out

    # ---- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        cpu = lambda d: {k: v.detach().cpu().clone() for k, v in d.items()}  # noqa: E731
        return {
            "names": list(self.probes),
            "in_features": {n: p.linear.in_features for n, p in self.probes.items()},
            "probes": {n: cpu(p.state_dict()) for n, p in self.probes.items()},
            "moments": {n: cpu(m) for n, m in self.moments.items()},
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.probes, self.moments = {}, {}
        for name in state["names"]:
            probe = self.ensure(name, state["in_features"][name], device)
            probe.load_state_dict(state["probes"][name])
        self.moments = {n: {k: v.to(device) for k, v in m.items()} for n, m in state["moments"].items()}
