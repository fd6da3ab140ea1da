"""Training many linear probes online, one per layer, with one optimizer and no Trainer."""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.nn.functional as F

from lightning_interp._distributed import all_gather_rows, all_reduce_, world_size
from lightning_interp.probes.linear_probe import LinearProbe

__all__ = ["ProbeBank"]


class ProbeBank:
    """One :class:`LinearProbe` per layer, trained together on each batch's detached activations with one Adam.

    Layers appear lazily (a probe is created the first time its layer is seen, seeded by ``seed`` and the layer
    name, independent of the global RNG). A layer whose activations are not finite on a step is skipped for that
    step (no statistics update, no gradient). Under ``torch.distributed`` the feature moments, the skip decisions
    and the gradients are averaged across ranks, so every replica stays identical.

    Example:
        >>> bank = ProbeBank(num_classes=3, lr=0.1)
        >>> x = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
        >>> y = x[:, :3].argmax(1)  # a linearly separable rule
        >>> for _ in range(50):
        ...     _ = bank.train_step({"layer": x}, y)
        >>> (bank.predict({"layer": x})["layer"] == y).float().mean().item() > 0.9
        True
    """

    def __init__(self, num_classes: int, lr: float = 1e-3, seed: int = 0) -> None:
        self.num_classes = num_classes
        self.lr = lr
        self.seed = seed
        self.probes: dict[str, LinearProbe] = {}
        self.optimizer: torch.optim.Optimizer | None = None

    def __len__(self) -> int:
        return len(self.probes)

    def ensure(self, name: str, in_features: int, device: torch.device | str = "cpu") -> LinearProbe:
        """The probe of ``name``, created on first use."""
        probe = self.probes.get(name)
        if probe is None:
            probe = LinearProbe(in_features, self.num_classes, seed=self.seed + zlib.crc32(name.encode())).to(device)
            self.probes[name] = probe
            params = list(probe.parameters())
            if self.optimizer is None:
                self.optimizer = torch.optim.Adam(params, lr=self.lr)
            else:
                self.optimizer.add_param_group({"params": params})
        return probe

    def to(self, device: torch.device | str) -> ProbeBank:
        for probe in self.probes.values():
            probe.to(device)
        if self.optimizer is not None:  # Adam's moments follow their parameters
            for state in self.optimizer.state.values():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and key != "step":
                        state[key] = value.to(device)
        return self

    def _finite_layers(self, activations: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = sorted(activations)
        finite = torch.tensor([bool(torch.isfinite(activations[n]).all()) for n in names], dtype=torch.float32)
        if world_size() > 1:
            device = activations[names[0]].device if names else "cpu"
            finite = all_reduce_(finite.to(device), "min").cpu()
        return {n: activations[n] for n, ok in zip(names, finite.tolist()) if ok}

    @torch.no_grad()
    def predict(self, activations: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Predicted classes of every layer that has a probe and finite activations."""
        return {
            name: self.probes[name](x).argmax(1)
            for name, x in activations.items()
            if name in self.probes and bool(torch.isfinite(x).all())
        }

    def train_step(self, activations: dict[str, torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """One Adam step of every probe on ``activations`` (``{layer: (B, F)}``); returns the predictions made
        *before* the step (an honest online training accuracy). Layers with non-finite values are skipped."""
        usable = self._finite_layers(activations)
        if not usable:
            return {}
        for name, x in usable.items():
            self.ensure(name, x.shape[1], x.device)
        self._update_statistics(usable)
        predictions: dict[str, torch.Tensor] = {}
        with torch.enable_grad():
            loss = torch.zeros((), device=targets.device)
            for name, x in usable.items():
                logits = self.probes[name](x)
                predictions[name] = logits.detach().argmax(1)
                loss = loss + F.cross_entropy(logits, targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self._sync_gradients(usable)
        self.optimizer.step()
        return predictions

    def _update_statistics(self, usable: dict[str, torch.Tensor]) -> None:
        names = list(usable)
        if world_size() == 1:
            for name in names:
                self.probes[name].update_statistics(usable[name])
            return
        # average first and second moments across ranks in one collective, then derive the variance
        moments = torch.cat([torch.cat([usable[n].mean(0), usable[n].pow(2).mean(0)]) for n in names])
        all_reduce_(moments, "mean")
        offset = 0
        for name in names:
            width = usable[name].shape[1]
            mean, sq = moments[offset : offset + width], moments[offset + width : offset + 2 * width]
            self.probes[name].update_statistics(mean, (sq - mean.pow(2)).clamp_min(0))
            offset += 2 * width

    def _sync_gradients(self, usable: dict[str, torch.Tensor]) -> None:
        if world_size() == 1:
            return
        grads = [p.grad for name in usable for p in self.probes[name].parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        all_reduce_(flat, "mean")
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def refit(self, name: str, features: torch.Tensor, targets: torch.Tensor, max_iter: int = 100, l2: float = 1e-4) -> None:
        """Refit one probe by full-batch L-BFGS (strong-Wolfe line search) on cached activations.

        Under ``torch.distributed`` every rank's cache is gathered first, so all replicas solve the same problem.
        The standardisation is reset to the cache's own moments.
        """
        features, targets = all_gather_rows(features), all_gather_rows(targets)
        probe = self.ensure(name, features.shape[1], features.device)
        probe.num_updates.zero_()
        probe.update_statistics(features)
        standardized = probe.standardize(features)
        optimizer = torch.optim.LBFGS(
            probe.linear.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(probe.linear(standardized), targets) + l2 * probe.linear.weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        for param in probe.linear.parameters():
            param.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.probes),
            "in_features": {n: p.linear.in_features for n, p in self.probes.items()},
            "probes": {n: {k: v.detach().cpu().clone() for k, v in p.state_dict().items()} for n, p in self.probes.items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.probes, self.optimizer = {}, None
        for name in state["names"]:
            probe = self.ensure(name, state["in_features"][name], device)
            probe.load_state_dict(state["probes"][name])
        if state["optimizer"] is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
