"""LinearProbeMonitor: a linear classifier probe on every hidden layer, its accuracy at every epoch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_interp._distributed import all_gather_object, all_gather_rows, all_reduce_, world_size
from lightning_interp._validation import (
    check_choice,
    check_optional_positive_int,
    check_positive_float,
    check_positive_int,
)
from lightning_interp.batches import BatchAdapter, ModelBatch, TargetsFn, call_model, unpack_batch
from lightning_interp.callbacks._base import InterpCallback
from lightning_interp.errors import LightningInterpError
from lightning_interp.examples import sample_batches, training_loader
from lightning_interp.hooks import ActivationCapture
from lightning_interp.layers import INPUT, Layer, called_functionally, last_linear, never_ran_message, select_layers
from lightning_interp.probes import SEQUENCE_REDUCTIONS, AccuracyCounter, ActivationReducer, ProbeBank
from lightning_interp.render import colorize, upscale
from lightning_interp.tensorboard import add_custom_scalar_charts, add_rgb_image, tensorboard_writer

__all__ = ["LinearProbeMonitor"]

FITS = ("frozen", "online")


class LinearProbeMonitor(InterpCallback):
    """Linear classifier probes (Alain & Bengio 2016) on every hidden layer: how linearly decodable each layer's
    representation is, epoch by epoch.

    The chosen layers' outputs are captured by forward hooks, detached and reduced on capture
    (:class:`~lightning_interp.probes.ActivationReducer`: conv maps pooled to 2x2 per channel, sequences averaged
    over their real tokens, wide layers cut to a fixed random subset of ``max_features``). Each layer's probe is a
    multinomial logistic regression on standardised features. Two ways to train it (``fit``):

    * ``"frozen"`` (default): at every validation run (and at a training epoch's end when no validation runs), the
      monitor makes its own eval-mode pass, without gradients, over a fixed sample of ``fit_examples`` training
      examples (``probe_dataloader``'s when given) with the weights of that moment, and fits every probe to
      convergence on those frozen activations (scikit-learn's ``LogisticRegression(C=c)`` objective, by L-BFGS
      warm-started from the previous epoch). ``probe/val_acc`` is then the accuracy of a well-fitted linear
      classifier on the representation the validation sees, which is what an offline fit on that epoch's frozen
      activations gives (tested against scikit-learn at every epoch). Training steps cost nothing.
    * ``"online"``: one Adam step of each probe on every training batch's activations (train mode, weights
      moving), as self-supervised codebases do for online linear evaluation; cheaper at scale (no extra pass),
      but a noisy, lagging reading. No host synchronisation on the training steps.

    Logged through ``LightningModule.log`` (any logger):

    * ``probe/val_acc/<layer>``: accuracy on the whole validation set (``probe_val_dataloader`` when given);
    * ``probe/train_acc/<layer>``: ``"frozen"``: accuracy on the fitting sample (the fit's training accuracy);
      ``"online"``: on the epoch's training batches, each scored *before* the probe learns from it.

    With a TensorBoardLogger also: a custom-scalars layout (``probe`` section: one chart per split with every
    layer), the image ``probe/acc_vs_depth`` (rows = epochs, columns = layers, colour = validation accuracy) and the
    text ``probe/layers`` (the resolved layers, and those that produced nothing on the first training batch).

    ``monitor.history`` holds every reading (``{"train": {layer: [...]}, "val": {layer: [...]}}``) and
    ``monitor.fit_iterations`` the L-BFGS iterations of each layer's last frozen fit.

    Self-supervised training (no classification head, labels not the model's targets): pass ``num_classes``, the
    labels' location (``target_key``, ``targets_fn``) and, for batches of several augmented views, ``view``; or a
    labelled ``probe_dataloader`` (and ``probe_val_dataloader``) when the training batches carry no labels.

    Args:
        layers: which layers to probe: ``None`` for every hidden layer plus ``input`` (see
            :func:`~lightning_interp.layers.select_layers`: the blocks of a transformer or ResNet, else the
            nonlinearities), or names, glob patterns, module types, or predicates.
        num_classes: number of classes; inferred from the last ``nn.Linear``'s width when ``None`` (required when
            the labels come from ``target_key``, ``targets_fn`` or ``probe_dataloader``).
        fit: ``"frozen"`` or ``"online"`` (see above).
        fit_examples: size of the fixed training sample of a ``"frozen"`` fit (the whole training set when it is
            smaller). Its cached activations take ``fit_examples x (sum of the layers' reduced widths) x 4`` bytes.
        c: inverse L2 strength of a ``"frozen"`` fit, as scikit-learn's ``C``.
        max_iter: L-BFGS iterations of a ``"frozen"`` fit at most (a cap for ill-conditioned layers, such as the
            collapsed upper blocks of a Post-LN transformer that does not train; well-conditioned ones stop by
            ``tol`` after tens of iterations).
        tol: a ``"frozen"`` fit stops when no gradient entry of its objective (mean cross-entropy plus the L2 term)
            exceeds this. 1e-4 reads the same accuracies as 1e-6 on the tested models with 3-5x fewer iterations.
        lr: Adam learning rate of ``"online"`` probes.
        pool_size: conv maps are average-pooled to ``pool_size x pool_size`` per channel.
        max_features: wider activations keep a fixed random subset of this many features.
        sequence_reduction: ``(B, T, D)`` outputs: ``"mean"`` over real tokens (the batch's ``attention_mask``),
            ``"first"`` token (CLS) or ``"last"`` real token.
        batch_size: examples per forward of the monitor's own passes.
        probe_dataloader: labelled data to fit ``"frozen"`` probes on instead of the training data.
        probe_val_dataloader: labelled data to evaluate the probes on instead of the validation loop's batches.
        target_key: take the labels from ``batch[target_key]``.
        targets_fn: take the labels from ``targets_fn(batch)``.
        view: for batches whose input is a list of augmented views, the one to probe.
        batch_adapter: ``batch -> (inputs, targets)`` for batch formats that are not ``(x, y)`` pairs or dicts.
        output_key: key or index of the tensor to probe when a layer returns a tuple or dict.
        seed: seed of probe initialisation, feature subsets and the fitting sample.

    Example:
        >>> from lightning import Trainer
        >>> from lightning_interp.data import DigitsDataModule
        >>> from lightning_interp.models import DigitsCNN
        >>> monitor = LinearProbeMonitor(fit_examples=256)
        >>> trainer = Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=1, callbacks=[monitor],
        ...                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False)
        >>> trainer.fit(DigitsCNN(), DigitsDataModule())  # doctest: +ELLIPSIS
        >>> sorted(monitor.history["val"])
        ['input', 'net.relu1', 'net.relu2', 'net.relu3', 'net.relu4']
    """

    STATE_VERSION = 2
    WHERE_TO_LOOK = "Custom Scalars, section `probe` (one chart per split, every layer); Images `probe/acc_vs_depth`"

    def __init__(
        self,
        layers: str | Sequence[str | type | Callable[..., bool]] | None = None,
        num_classes: int | None = None,
        fit: Literal["frozen", "online"] = "frozen",
        fit_examples: int = 4096,
        c: float = 1.0,
        max_iter: int = 1000,
        tol: float = 1e-4,
        lr: float = 1e-2,
        pool_size: int = 2,
        max_features: int = 4096,
        sequence_reduction: Literal["mean", "first", "last"] = "mean",
        batch_size: int = 256,
        probe_dataloader: Any = None,
        probe_val_dataloader: Any = None,
        target_key: str | int | None = None,
        targets_fn: TargetsFn | None = None,
        view: int = 0,
        batch_adapter: BatchAdapter | None = None,
        output_key: str | int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.layers = layers
        self.num_classes = check_optional_positive_int("num_classes", num_classes, minimum=2)
        self.fit = check_choice("fit", fit, FITS)
        self.fit_examples = check_positive_int("fit_examples", fit_examples)
        self.c = check_positive_float("c", c)
        self.max_iter = check_positive_int("max_iter", max_iter)
        self.tol = check_positive_float("tol", tol)
        self.lr = check_positive_float("lr", lr)
        self.reducer = ActivationReducer(pool_size, max_features, seed, check_choice(
            "sequence_reduction", sequence_reduction, SEQUENCE_REDUCTIONS))  # fmt: skip
        self.batch_size = check_positive_int("batch_size", batch_size)
        for name, loader in (("probe_dataloader", probe_dataloader), ("probe_val_dataloader", probe_val_dataloader)):
            if loader is not None and not hasattr(loader, "__iter__"):
                raise LightningInterpError(
                    f"Expected argument `{name}` to be a DataLoader (or any iterable of labelled batches), but got "
                    f"{type(loader).__name__}."
                )
        self.probe_dataloader = probe_dataloader
        self.probe_val_dataloader = probe_val_dataloader
        if targets_fn is not None and not callable(targets_fn):
            raise LightningInterpError(
                f"Expected argument `targets_fn` to be a callable batch -> labels, but got {type(targets_fn).__name__}."
            )
        self.target_key = target_key
        self.targets_fn = targets_fn
        if isinstance(view, bool) or not isinstance(view, int):
            raise LightningInterpError(f"Expected argument `view` to be an int index of the views, but got {view!r}.")
        self.view = view
        self.batch_adapter = batch_adapter
        self.output_key = output_key
        self.seed = seed
        self.history: dict[str, dict[str, list[float]]] = {"train": {}, "val": {}}
        self.resolved_layers: list[Layer] = []
        self.not_fired: list[str] = []
        self.fit_iterations: dict[str, int] = {}
        self.bank: ProbeBank | None = None
        self._capture: ActivationCapture | None = None
        self._counters: dict[str, dict[str, AccuracyCounter]] = {"train": {}, "val": {}}
        self._pending_state: dict[str, Any] | None = None
        self._first_batch = False
        self._fired_checked = False
        self._fitted_step: int | None = None
        self._skipped: dict[str, torch.Tensor] = {}

    @override
    def _config(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "num_classes": self.num_classes,
            "fit": self.fit,
            "fit_examples": self.fit_examples,
            "c": self.c,
            "lr": self.lr,
            "pool_size": self.reducer.pool_size,
            "max_features": self.reducer.max_features,
            "sequence_reduction": self.reducer.sequence_reduction,
            "seed": self.seed,
        }

    # ---- set-up ----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.idle = None
        self._capture = None
        self.resolved_layers = select_layers(pl_module, self.layers)
        if self.num_classes is None:
            own_labels = self._first_given("target_key", "targets_fn", "probe_dataloader")
            if own_labels is not None:
                raise LightningInterpError(
                    f"LinearProbeMonitor cannot infer `num_classes` when the labels come from `{own_labels}` (the "
                    "model's last layer is not a classifier over them). Pass `num_classes=` to LinearProbeMonitor."
                )
            head = last_linear(pl_module)
            if head is None:
                self._go_idle("no_num_classes", "could not infer `num_classes`: the model has no nn.Linear layer; "
                              "pass `num_classes=` to LinearProbeMonitor")  # fmt: skip
                return
            self.num_classes = head.module.out_features  # type: ignore[union-attr]
        if self.bank is None:
            self.bank = ProbeBank(self.num_classes, lr=self.lr, seed=self.seed)
        self._capture = ActivationCapture(
            self.resolved_layers, self.reducer, self.output_key, self.problems, hooks=self.hooks
        )

    def _attach(self, pl_module: LightningModule) -> None:
        if self._pending_state is not None:
            self.bank.load_state_dict(self._pending_state, pl_module.device)
            self._pending_state = None
        self.bank.to(pl_module.device)
        self._capture.attach()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.idle:
            return
        # registered here, not in setup: callbacks such as weight averaging deep-copy the model in their setup
        self._attach(pl_module)
        self._capture.fired.clear()
        self._first_batch = True
        self._fired_checked = False
        names = [layer.name for layer in self.resolved_layers]
        rank_zero_info(f"LinearProbeMonitor: probing {len(names)} layers: {', '.join(names)}")
        writer = tensorboard_writer(trainer, self.problems)
        if writer is not None:
            add_custom_scalar_charts(
                writer,
                "probe",
                {"train accuracy, every layer": [r"probe/train_acc/.*"], "validation accuracy, every layer": [r"probe/val_acc/.*"]},
            )

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._capture is not None and trainer.state.fn != TrainerFn.FITTING and not len(self.hooks):
            self._attach(pl_module)  # trainer.validate(): evaluate the probes we have

    # ---- batches ---------------------------------------------------------------------------------------------
    def _unpack(self, batch: Any, require_targets: bool = True) -> ModelBatch:
        return unpack_batch(batch, self.batch_adapter, require_targets, self.view, self.target_key, self.targets_fn)

    def _labels_in_training_batches(self) -> bool:
        return self.fit == "online" or self.probe_dataloader is None

    def _start_capture(self, batch: Any) -> None:
        capture = self._capture
        capture.clear()
        capture.active = True
        try:
            capture.mask = self._unpack(batch, require_targets=False).attention_mask
        except LightningInterpError:
            capture.mask = None

    def _collect(self, batch: Any, require_targets: bool = True) -> tuple[dict[str, torch.Tensor], ModelBatch] | None:
        """The reduced activations of the batch that just ran (the input added), and the batch."""
        capture = self._capture
        capture.active = False
        try:
            unpacked = self._unpack(batch, require_targets)
        except LightningInterpError:  # the first training batch was checked (_first_batch_problem): skip, count
            self.problems.report("bad_batch", "a batch had no recognisable (inputs, targets); it is skipped")
            return None
        if any(layer.is_input for layer in self.resolved_layers) and unpacked.inputs.is_floating_point():
            capture.put(INPUT, unpacked.inputs)
        activations = capture.activations
        capture.clear()
        usable = {}
        for name, x in activations.items():
            if x.shape[0] != len(unpacked):
                self.problems.report("batch_mismatch", f"layer `{name}` gave {x.shape[0]} rows for {len(unpacked)} examples")
                continue
            usable[name] = x
        return usable, unpacked

    def _first_batch_problem(self, batch: Any) -> str | None:
        """What makes the first training batch unusable for probes, checked once on the host (later batches are
        masked on the device instead). With labels configured explicitly (``batch_adapter``, ``target_key``,
        ``targets_fn``) a problem raises; at the defaults it is returned, and the monitor goes idle."""
        explicit = self._first_given("batch_adapter", "target_key", "targets_fn")
        problem = None
        try:
            targets = self._unpack(batch, self._labels_in_training_batches()).targets
        except LightningInterpError as err:
            problem, targets = str(err), None
        if targets is None:
            pass  # unlabelled batches (a probe_dataloader gives the labels), or the problem above
        elif targets.is_floating_point() or targets.is_complex() or targets.dim() != 1:
            problem = (
                f"LinearProbeMonitor needs 1-D integer class indices as targets, but got dtype {targets.dtype} "
                f"and shape {tuple(targets.shape)}. Probes are classifiers: pass `batch_adapter=` (or `target_key=`, "
                "`targets_fn=`) giving class indices, or leave the monitor out for regression models"
            )
        elif targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.num_classes):
            problem = (
                f"LinearProbeMonitor got targets in [{int(targets.min())}, {int(targets.max())}] but "
                f"`num_classes` is {self.num_classes}; pass the right `num_classes=`"
            )
        if problem is not None and explicit is not None:
            raise LightningInterpError(f"{problem} (with `{explicit}` given)")
        return problem

    def _first_given(self, *arguments: str) -> str | None:
        """The first of these arguments the user set (not ``None``), or ``None``."""
        return next((name for name in arguments if getattr(self, name) is not None), None)

    @staticmethod
    def _agreed(flag: bool, pl_module: LightningModule) -> bool:
        """``flag`` on any rank (one collective; every rank calls it at the same point)."""
        if world_size() == 1:
            return flag
        return bool(all_reduce_(torch.tensor([float(flag)], device=pl_module.device), "max") > 0)

    def _counter(self, split: str, name: str) -> AccuracyCounter:
        return self._counters[split].setdefault(name, AccuracyCounter())

    def _count(self, split: str, predictions: dict[str, tuple[torch.Tensor, torch.Tensor]], targets: torch.Tensor,
               valid: torch.Tensor | None = None) -> None:  # fmt: skip
        if valid is None:
            valid = (targets >= 0) & (targets < self.num_classes)
        for name, (predicted, finite) in predictions.items():
            self._counter(split, name).update(predicted, targets, valid & finite)
            if split == "train" and self.fit == "online":
                self._tally("nan_activations", ~finite)
        if split == "train" and self.fit == "online":
            self._tally("bad_targets", ~valid)

    def _tally(self, kind: str, flags: torch.Tensor) -> None:
        """Count problems as a tensor (no host synchronisation); read and reported at the epoch's end."""
        count = flags.sum()
        self._skipped[kind] = count if kind not in self._skipped else self._skipped[kind] + count

    def _report_tallies(self) -> None:
        if not self._skipped:
            return
        counts = {kind: int(value) for kind, value in self._skipped.items()}
        self._skipped = {}
        self.problems.report("nan_activations", "a layer produced NaN/Inf; that probe's step was skipped",
                             counts.get("nan_activations", 0))
        self.problems.report("bad_targets", f"targets outside [0, {self.num_classes}) were left out of the probes' "
                             "loss", counts.get("bad_targets", 0))  # fmt: skip

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.idle and (self.fit == "online" or self._first_batch):
            self._start_capture(batch)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.idle or not (self.fit == "online" or self._first_batch):
            return
        if self._first_batch:
            self._first_batch = False
            problem = self._first_batch_problem(batch)
            if self._agreed(problem is not None, pl_module):  # every rank idles, or none
                self._go_idle("unusable_batches", problem or "another process could not read its first batch")
                return
        collected = self._collect(batch, require_targets=self._labels_in_training_batches())
        if collected is None:
            return
        activations, unpacked = collected
        if not self._fired_checked:
            self._fired_checked = True
            self._check_fired(trainer, unpacked)
        if self.fit != "online" or not activations or unpacked.targets is None:
            return
        targets = unpacked.targets.to(next(iter(activations.values())).device)
        with torch.autocast(device_type=targets.device.type, enabled=False):
            predictions = self.bank.train_step(activations, targets)
        self._count("train", predictions, targets)

    def _check_fired(self, trainer: Trainer, unpacked: ModelBatch) -> None:
        """After the first training batch: drop (and say) the layers that produced nothing, so that what is
        announced is what is probed."""
        fired = self._capture.fired
        missing = [layer.name for layer in self.resolved_layers if not layer.is_input and layer.name not in fired]
        kept = [layer for layer in self.resolved_layers if layer.name not in missing]
        if any(layer.is_input for layer in kept) and not unpacked.inputs.is_floating_point():
            kept = [layer for layer in kept if not layer.is_input]
            rank_zero_info(
                f"LinearProbeMonitor: the model input is {unpacked.inputs.dtype} (token ids), not features; "
                "layer `input` is not probed."
            )
        if missing:
            functional = called_functionally(trainer.lightning_module)
            self.problems.report("never_fired", never_ran_message(missing, functional) + f" on the first training "
                                 f"batch: {len(missing)} of the {len(self.resolved_layers)} layers announced are not "
                                 "probed")  # fmt: skip
        self.not_fired = missing
        self.resolved_layers = kept
        self._capture.layers = [layer for layer in kept if not layer.is_input]
        self._capture.attach()
        writer = tensorboard_writer(trainer)
        if writer is not None:
            rows = [f"| {i} | `{layer.name}` | {'model input' if layer.is_input else type(layer.module).__name__} |"
                    for i, layer in enumerate(kept)]  # fmt: skip
            rows += [f"| - | `{name}` | never ran on the first training batch: not probed |" for name in missing]
            writer.add_text("probe/layers", "| # | layer | module |\n|---|---|---|\n" + "\n".join(rows), trainer.global_step)

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or self._capture is None or self.idle:
            return
        if self.fit == "frozen":
            self._fit_frozen(trainer, pl_module)
        if self.probe_val_dataloader is not None:
            self._evaluate_loader(trainer, pl_module)

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._capture is not None and not self.idle and not trainer.sanity_checking and self.probe_val_dataloader is None:
            self._start_capture(batch)

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
        collected = self._collect(batch, require_targets=False)
        if collected is None:
            return
        activations, unpacked = collected
        if unpacked.targets is None:
            self.problems.report("unlabelled_validation", "validation batches carry no labels; pass "
                                 "`probe_val_dataloader=` (or `target_key=`/`targets_fn=`) to evaluate the probes")  # fmt: skip
            return
        with torch.autocast(device_type=pl_module.device.type, enabled=False):
            predictions = self.bank.predict(activations)
        self._count("val", predictions, unpacked.targets.to(pl_module.device))

    # ---- the monitor's own passes (frozen fit, evaluation on a given loader) -----------------------------------
    def _frozen_pass(
        self, trainer: Trainer, pl_module: LightningModule, loader: Any, max_examples: int | None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        """Reduced activations and labels of a fixed sample of ``loader``, in eval mode without gradients, every
        rank's share gathered (the same on every rank); ``None`` (reported) when any rank's pass failed."""
        local: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None
        error: Exception | None = None
        modes = [(module, module.training) for module in pl_module.modules()]
        try:
            pl_module.eval()
            with torch.no_grad():
                local = self._local_pass(trainer, pl_module, loader, max_examples)
        except Exception as err:  # noqa: BLE001 - a failing pass must never stop training; reported below
            error = err
        finally:
            for module, mode in modes:
                module.training = mode
            self._capture.active = False
            self._capture.clear()
        if world_size() > 1:  # every rank learns whether all shares are there before any gather
            ok = all_reduce_(torch.tensor([0.0 if error else 1.0], device=pl_module.device), "min")
            if error is None and float(ok) < 1:
                error = LightningInterpError("another process failed its share of the pass")
        if error is not None or local is None:
            self.problems.report("probe_pass_failed", f"the probes' own pass failed and was skipped ({error})")
            return None
        features, targets = local
        widths = {name: x.shape[1] for name, x in features.items()}
        agreed: dict[str, int] = {}
        for other in all_gather_object(widths):
            agreed.update(other)  # type: ignore[arg-type]
        device = pl_module.device
        gathered = {}
        for name in sorted(agreed):
            x = features.get(name, torch.zeros((0, agreed[name]), device=device))
            gathered[name] = all_gather_rows(x.to(device))
        return gathered, all_gather_rows(targets.to(device))

    def _local_pass(
        self, trainer: Trainer, pl_module: LightningModule, loader: Any, max_examples: int | None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        labels: list[torch.Tensor] = []
        device = pl_module.device
        batches = sample_batches(loader, max_examples, self.seed, self.batch_size, trainer.global_rank, world_size(),
                                 batch_adapter=self.batch_adapter)
        for raw, _ in batches:
            try:
                batch = self._unpack(raw).to(device)
            except LightningInterpError:
                self.problems.report("bad_batch", "a batch of the probes' own pass had no labels; it is skipped")
                continue
            capture = self._capture
            capture.clear()
            capture.mask = batch.attention_mask
            capture.active = True
            call_model(pl_module, batch)
            collected = self._collect_pass(batch)
            for name, x in collected.items():
                parts.setdefault(name, []).append(x)
            labels.append(batch.targets.reshape(-1).long())
        if not labels:
            raise LightningInterpError("the sample held no labelled batch")
        n = sum(len(t) for t in labels)
        return {k: torch.cat(v) for k, v in parts.items() if sum(len(t) for t in v) == n}, torch.cat(labels)

    def _collect_pass(self, batch: ModelBatch) -> dict[str, torch.Tensor]:
        capture = self._capture
        capture.active = False
        if any(layer.is_input for layer in self.resolved_layers) and batch.inputs.is_floating_point():
            capture.put(INPUT, batch.inputs)
        out = {name: x for name, x in capture.activations.items() if x.shape[0] == len(batch)}
        capture.clear()
        return out

    def _fit_frozen(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loader = self.probe_dataloader if self.probe_dataloader is not None else training_loader(trainer)
        if loader is None:
            self.problems.report("no_fit_data", "no training data to fit the probes on; pass `probe_dataloader=`")
            return
        self._fitted_step = trainer.global_step
        sample = self._frozen_pass(trainer, pl_module, loader, self.fit_examples)
        if sample is None:
            return
        features, targets = sample
        valid = (targets >= 0) & (targets < self.num_classes)
        self.problems.report("bad_targets", f"examples with labels outside [0, {self.num_classes}) were left out of "
                             "the probes' fit", int((~valid).sum()))  # fmt: skip
        with torch.inference_mode(False), torch.autocast(device_type=pl_module.device.type, enabled=False):
            for name, x in features.items():
                finite = torch.isfinite(x).all(1)
                keep = valid & finite
                self.problems.report("nan_activations", f"examples whose layer `{name}` held NaN/Inf were left out "
                                     "of its probe's fit", int((~finite).sum()))  # fmt: skip
                if int(keep.sum()) == 0:
                    continue
                x, y = x[keep].clone(), targets[keep].clone()
                self.fit_iterations[name] = self.bank.fit(name, x, y, c=self.c, max_iter=self.max_iter, tol=self.tol)
                predicted, finite = self.bank.predict({name: x})[name]
                self._counter("train", name).update(predicted, y, finite)

    def _evaluate_loader(self, trainer: Trainer, pl_module: LightningModule) -> None:
        sample = self._frozen_pass(trainer, pl_module, self.probe_val_dataloader, None)
        if sample is None:
            return
        features, targets = sample
        self._count("val", self.bank.predict(features), targets)

    # ---- epoch ends --------------------------------------------------------------------------------------------
    def _log_split(self, split: str, pl_module: LightningModule) -> None:
        # every rank walks the same layers (the probes, identical on every rank) and makes the same collectives and
        # log calls, even a rank whose batches of a layer were all skipped (NaN) or that had no batch at all
        names = sorted(set(self._counters[split]) | set(self.bank.probes), key=self._layer_order)
        for name in names:
            value = self._counter(split, name).compute(pl_module.device)  # sums over ranks
            pl_module.log(f"probe/{split}_acc/{name}", value, on_step=False, on_epoch=True)
            self.history[split].setdefault(name, []).append(value)

    def _layer_order(self, name: str) -> tuple[int, str]:
        base, _, call = name.partition("@")
        names = [layer.name for layer in self.resolved_layers]
        return (names.index(base) if base in names else len(names), call)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.idle or self._capture is None:
            return
        self._report_tallies()
        if self.fit == "frozen":
            if self._fitted_step == trainer.global_step:
                return  # fitted and logged at this epoch's validation
            self._fit_frozen(trainer, pl_module)
            if self.probe_val_dataloader is not None:
                self._evaluate_loader(trainer, pl_module)
                self._log_split("val", pl_module)
                self._write_depth_image(trainer)
        self._log_split("train", pl_module)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.idle or self.bank is None or not (self._counters["val"] or self.bank.probes):
            return
        self._log_split("val", pl_module)
        if self.fit == "frozen" and trainer.state.fn == TrainerFn.FITTING and self._fitted_step == trainer.global_step:
            self._log_split("train", pl_module)
        self._write_depth_image(trainer)

    def _write_depth_image(self, trainer: Trainer) -> None:
        writer = tensorboard_writer(trainer)
        if writer is not None:
            add_rgb_image(writer, "probe/acc_vs_depth", self.depth_image(), trainer.current_epoch)
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
