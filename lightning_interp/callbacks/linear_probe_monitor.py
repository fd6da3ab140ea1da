"""LinearProbeMonitor: a linear classifier probe on every hidden layer, trained online during ``fit``."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_interp._distributed import all_reduce_
from lightning_interp._validation import check_choice, check_optional_positive_int, check_positive_float, check_positive_int
from lightning_interp.batches import BatchAdapter, split_batch
from lightning_interp.callbacks._base import InterpCallback
from lightning_interp.errors import LightningInterpError
from lightning_interp.hooks import ActivationCapture
from lightning_interp.layers import INPUT, Layer, last_linear, select_layers
from lightning_interp.probes import ActivationReducer, ProbeBank
from lightning_interp.render import colorize, upscale
from lightning_interp.tensorboard import add_custom_scalar_charts, tensorboard_writer

__all__ = ["LinearProbeMonitor"]


class LinearProbeMonitor(InterpCallback):
    """Linear classifier probes (Alain & Bengio 2016) on every hidden layer, trained online while the model trains.

    On each training batch the chosen layers' outputs are captured by forward hooks, detached, reduced
    (:class:`~lightning_interp.probes.ActivationReducer`: conv maps pooled to 2x2 per channel, wide layers cut to a
    fixed random subset of ``max_features``) and used for one Adam step of each layer's probe (multinomial
    logistic regression after a non-affine standardisation). The model's parameters, gradients, optimizer, modes
    and the global RNG are never touched.

    Logged through ``LightningModule.log`` (any logger):

    * ``probe/train_acc/<layer>``: accuracy of each probe on the epoch's training batches, each batch scored
      before the probe learns from it;
    * ``probe/val_acc/<layer>``: accuracy on the whole validation set at the end of each validation run.

    With a TensorBoardLogger also: a custom-scalars layout (``probe`` section: one chart per split with every
    layer), the image ``probe/acc_vs_depth`` (rows = epochs, columns = layers, colour = validation accuracy) and the
    text ``probe/layers`` (the resolved layers).

    Note:
        With BatchNorm, probes trained on train-mode activations score poorly on eval-mode (running-statistics)
        activations early in training; the gap closes as the running statistics settle.

    Args:
        layers: which layers to probe: ``None`` for every hidden layer plus ``input``, or names, glob patterns,
            module types, or predicates (see :func:`~lightning_interp.layers.select_layers`).
        num_classes: number of classes; inferred from the last ``nn.Linear``'s width when ``None``.
        lr: Adam learning rate of the probes. 1e-2 rather than 1e-3: on digits (23 steps an epoch) probes at
            1e-3 are still 7 points below an offline logistic regression after 10 epochs; at 1e-2 within 1.
        pool_size: conv maps are average-pooled to ``pool_size x pool_size`` per channel.
        max_features: wider activations keep a fixed random subset of this many features.
        refit: ``"lbfgs"`` refits every probe at each training epoch end by full-batch L-BFGS on activations cached
            during the epoch (at most ``max_cached_examples`` per layer); ``"none"`` keeps the online probes.
        max_cached_examples: cache bound of the ``"lbfgs"`` refit.
        batch_adapter: ``batch -> (inputs, targets)`` for batch formats that are not ``(x, y)`` pairs or dicts.
        output_key: key or index of the tensor to probe when a layer returns a tuple or dict.
        seed: seed of probe initialisation and feature subsets.

    Example:
        >>> from lightning import Trainer
        >>> from lightning_interp.data import DigitsDataModule
        >>> from lightning_interp.models import DigitsCNN
        >>> monitor = LinearProbeMonitor()
        >>> trainer = Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=1, callbacks=[monitor],
        ...                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False)
        >>> trainer.fit(DigitsCNN(), DigitsDataModule())  # doctest: +ELLIPSIS
        >>> sorted(monitor.history["val"])
        ['input', 'net.relu1', 'net.relu2', 'net.relu3', 'net.relu4']
    """

    STATE_VERSION = 1
    WHERE_TO_LOOK = "Custom Scalars, section `probe` (one chart per split, every layer); Images `probe/acc_vs_depth`"

    def __init__(
        self,
        layers: str | Sequence[str | type | Callable[..., bool]] | None = None,
        num_classes: int | None = None,
        lr: float = 1e-2,
        pool_size: int = 2,
        max_features: int = 4096,
        refit: Literal["none", "lbfgs"] = "none",
        max_cached_examples: int = 10000,
        batch_adapter: BatchAdapter | None = None,
        output_key: str | int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.layers = layers
        self.num_classes = check_optional_positive_int("num_classes", num_classes, minimum=2)
        self.lr = check_positive_float("lr", lr)
        self.reducer = ActivationReducer(pool_size=pool_size, max_features=max_features, seed=seed)
        self.refit = check_choice("refit", refit, ("none", "lbfgs"))
        self.max_cached_examples = check_positive_int("max_cached_examples", max_cached_examples)
        self.batch_adapter = batch_adapter
        self.output_key = output_key
        self.seed = seed
        self.history: dict[str, dict[str, list[float]]] = {"train": {}, "val": {}}
        self.resolved_layers: list[Layer] = []
        self.bank: ProbeBank | None = None
        self._capture: ActivationCapture | None = None
        self._metrics: dict[str, dict[str, MulticlassAccuracy]] = {"train": {}, "val": {}}
        self._cache: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._pending_state: dict[str, Any] | None = None
        self._targets_checked = False

    @override
    def _config(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "num_classes": self.num_classes,
            "lr": self.lr,
            "pool_size": self.reducer.pool_size,
            "max_features": self.reducer.max_features,
            "refit": self.refit,
            "seed": self.seed,
        }

    # ---- set-up ----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.resolved_layers = select_layers(pl_module, self.layers)
        if self.num_classes is None:
            head = last_linear(pl_module)
            if head is None:
                raise LightningInterpError(
                    "LinearProbeMonitor could not infer `num_classes`: the model has no nn.Linear layer. "
                    "Pass `num_classes=` to LinearProbeMonitor."
                )
            self.num_classes = head.module.out_features  # type: ignore[union-attr]
        if self.bank is None:
            self.bank = ProbeBank(self.num_classes, lr=self.lr, seed=self.seed)
        self._capture = ActivationCapture(
            self.resolved_layers, self.reducer, self.output_key, self.problems, hooks=self.hooks
        )

    def _attach(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending_state is not None:
            self.bank.load_state_dict(self._pending_state, pl_module.device)
            self._pending_state = None
        self.bank.to(pl_module.device)
        self._capture.attach()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # registered here, not in setup: callbacks such as weight averaging deep-copy the model in their setup
        self._attach(trainer, pl_module)
        names = [layer.name for layer in self.resolved_layers]
        rank_zero_info(f"LinearProbeMonitor: probing {len(names)} layers: {', '.join(names)}")
        writer = tensorboard_writer(trainer, self.problems)
        if writer is not None:
            table = "| # | layer | module |\n|---|---|---|\n" + "\n".join(
                f"| {i} | `{layer.name}` | {'model input' if layer.is_input else type(layer.module).__name__} |"
                for i, layer in enumerate(self.resolved_layers)
            )
            writer.add_text("probe/layers", table, global_step=trainer.global_step)
            add_custom_scalar_charts(
                writer,
                "probe",
                {"train accuracy, every layer": [r"probe/train_acc/.*"], "validation accuracy, every layer": [r"probe/val_acc/.*"]},
            )

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.training and not len(self.hooks):  # trainer.validate(): evaluate the probes we have
            self._attach(trainer, pl_module)

    # ---- batches ---------------------------------------------------------------------------------------------
    def _collect(self, batch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        capture = self._capture
        capture.active = False
        try:
            inputs, targets = split_batch(batch, self.batch_adapter)
        except LightningInterpError:
            if not self._targets_checked:
                raise
            self.problems.report("bad_batch", "a batch had no recognisable (inputs, targets); it is skipped")
            return None
        if not self._check_targets(targets):
            return None
        if any(layer.is_input for layer in self.resolved_layers):
            capture.put(INPUT, inputs)
        activations = capture.activations
        capture.clear()
        batch_size = targets.shape[0]
        usable = {}
        for name, x in activations.items():
            if x.shape[0] != batch_size:
                self.problems.report("batch_mismatch", f"layer `{name}` gave {x.shape[0]} rows for {batch_size} targets")
                continue
            if not torch.isfinite(x).all():
                self.problems.report("nan_activations", f"layer `{name}` produced NaN/Inf; that probe step is skipped")
            usable[name] = x
        return usable, targets.to(next(iter(usable.values())).device) if usable else targets

    def _check_targets(self, targets: torch.Tensor) -> bool:
        problem = None
        if targets.is_floating_point() or targets.is_complex() or targets.dim() != 1:
            problem = (
                f"LinearProbeMonitor needs 1-D integer class indices as targets, but got dtype {targets.dtype} "
                f"and shape {tuple(targets.shape)}. Probes are classifiers: pass `batch_adapter=` returning class "
                "indices, or leave the monitor out for regression models."
            )
        elif targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.num_classes):
            problem = (
                f"LinearProbeMonitor got targets in [{int(targets.min())}, {int(targets.max())}] but "
                f"`num_classes` is {self.num_classes}; pass the right `num_classes=`."
            )
        if problem is None:
            self._targets_checked = True
            return True
        if not self._targets_checked:
            raise LightningInterpError(problem)
        self.problems.report("bad_targets", problem + " The batch is skipped.")
        return False

    def _metric(self, split: str, name: str, device: torch.device) -> MulticlassAccuracy:
        metric = self._metrics[split].get(name)
        if metric is None:
            metric = self._metrics[split][name] = MulticlassAccuracy(self.num_classes, average="micro").to(device)
        return metric

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._capture.clear()
        self._capture.active = True

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        collected = self._collect(batch)
        if collected is None:
            return
        activations, targets = collected
        if not activations:
            return
        with torch.autocast(device_type=targets.device.type, enabled=False):
            predictions = self.bank.train_step(activations, targets)
        for name, predicted in predictions.items():
            self._metric("train", name, targets.device).update(predicted, targets)
        if self.refit == "lbfgs":
            for name, x in activations.items():
                cached = self._cache.setdefault(name, [])
                if sum(len(c[1]) for c in cached) < self.max_cached_examples and torch.isfinite(x).all():
                    cached.append((x, targets))

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._capture is not None and not trainer.sanity_checking:
            self._capture.clear()
            self._capture.active = True

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or self._capture is None or not self._capture.active:
            return
        collected = self._collect(batch)
        if collected is None:
            return
        activations, targets = collected
        with torch.autocast(device_type=targets.device.type, enabled=False):
            predictions = self.bank.predict(activations)
        for name, predicted in predictions.items():
            self._metric("val", name, targets.device).update(predicted, targets)

    # ---- epoch ends --------------------------------------------------------------------------------------------
    def _log_split(self, split: str, pl_module: LightningModule) -> None:
        # every rank walks the same layers (the probes, identical on every rank) and makes the same collectives and
        # log calls, even a rank whose batches of a layer were all skipped (NaN) or that had no batch at all
        names = sorted(set(self._metrics[split]) | set(self.bank.probes), key=self._layer_order)
        metrics = [self._metric(split, name, pl_module.device) for name in names]
        # which layers any rank updated: one collective for all of them
        updated = torch.tensor([float(m.update_called) for m in metrics], device=pl_module.device)
        seen_anywhere = all_reduce_(updated, "max").tolist()
        for name, metric, seen in zip(names, metrics, seen_anywhere):
            value = torch.tensor(float("nan"))
            if seen > 0:
                with warnings.catch_warnings():  # a rank without updates of its own still joins the sync
                    warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
                    value = metric.compute()  # syncs across ranks: every rank logs the same value
            pl_module.log(f"probe/{split}_acc/{name}", value, on_step=False, on_epoch=True)
            self.history[split].setdefault(name, []).append(float(value))
            metric.reset()

    def _layer_order(self, name: str) -> tuple[int, str]:
        base, _, call = name.partition("@")
        names = [layer.name for layer in self.resolved_layers]
        return (names.index(base) if base in names else len(names), call)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.refit == "lbfgs":
            for name, parts in self._cache.items():
                features = torch.cat([p[0] for p in parts])
                targets = torch.cat([p[1] for p in parts])
                self.bank.refit(name, features, targets)
            self._cache = {}
        self._log_split("train", pl_module)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not (self._metrics["val"] or self.bank.probes):
            return
        self._log_split("val", pl_module)
        writer = tensorboard_writer(trainer)
        if writer is not None:
            writer.add_image("probe/acc_vs_depth", self.depth_image(), trainer.current_epoch, dataformats="HWC")
            writer.flush()

    def depth_image(self, cell: int = 16) -> Any:
        """Validation accuracy as an image: one row per epoch (oldest on top), one column per layer (input
        left), colour from 0 (dark) to 1 (yellow) on an absolute scale."""
        names = sorted(self.history["val"], key=self._layer_order)
        epochs = max((len(v) for v in self.history["val"].values()), default=0)
        grid = torch.full((max(epochs, 1), max(len(names), 1)), float("nan"))
        for j, name in enumerate(names):
            values = self.history["val"][name]
            grid[epochs - len(values) : epochs, j] = torch.tensor(values)
        return upscale(colorize(grid.numpy(), normalize=False), cell)

    @override
    def _release(self) -> None:
        super()._release()
        if self._capture is not None:
            self._capture.clear()
            self._capture.active = False

    # ---- state ------------------------------------------------------------------------------------------------
    @override
    def _state(self) -> dict[str, Any]:
        bank = self.bank.state_dict() if self.bank is not None else self._pending_state
        return {"bank": bank, "history": {k: {n: list(v) for n, v in d.items()} for k, d in self.history.items()}}

    @override
    def _load_state(self, state: dict[str, Any]) -> None:
        history = state["history"]
        self.history = {split: {n: list(v) for n, v in history[split].items()} for split in ("train", "val")}
        self._pending_state = state["bank"]
        self._targets_checked = False
