"""NormStatsMonitor: statistics of every normalization layer and every hidden layer while the model trains."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_interp._distributed import sharded_strategy
from lightning_interp._validation import check_module_types, check_positive_int
from lightning_interp.callbacks._base import InterpCallback
from lightning_interp.errors import LightningInterpError
from lightning_interp.layers import (
    Layer,
    called_functionally,
    first_tensor,
    never_ran_message,
    normalization_layers,
    select_layers,
)
from lightning_interp.stats.norm_stats import (
    FIT_TOLERANCE,
    activation_stats,
    norm_layer_stats,
    snapshot_running_stats,
)
from lightning_interp.tensorboard import add_custom_scalar_charts, tensorboard_writer

__all__ = ["NormStatsMonitor"]

NORM_STATS = (
    "in_mean",
    "in_std",
    "out_mean",
    "out_std",
    "gamma_abs_mean",
    "beta_mean",
    "effective_gain",
    "running_mean_dist",
    "running_std_ratio",
)
HIDDEN_STATS = ("act_mean", "act_std", "saturated_frac", "dead_frac")


def logged_step(trainer: Trainer) -> bool:
    """Whether the training batch about to run is one whose step metrics Lightning writes to the loggers.

    Lightning writes step metrics when ``(optimizer steps so far + 1) % log_every_n_steps == 0``; evaluated in
    ``on_train_batch_start``, ``trainer.global_step`` is that count (``log_every_n_steps=0`` never logs).
    """
    n = trainer.log_every_n_steps
    return bool(n) and (trainer.global_step + 1) % n == 0


def histogram_sample(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """At most ``size`` evenly strided elements of ``tensor``, detached (bounded memory for histograms)."""
    flat = tensor.detach().reshape(-1)
    stride = max(1, flat.numel() // size)
    return flat[::stride][:size].float().clone()


class NormStatsMonitor(InterpCallback):
    """Statistics of every normalization layer and of the hidden layers, logged every ``log_every_n_steps``.

    Forward hooks on the training step's own forward read the inputs and outputs of each normalization layer
    (BatchNorm*, SyncBatchNorm, LayerNorm, GroupNorm, InstanceNorm*, RMSNorm, library classes by role — any
    ``*LayerNorm``/``*RMSNorm`` class with a weight, such as Hugging Face's ``LlamaRMSNorm`` or
    ``T5LayerNorm`` — and ``norm_types``) and the output of each hidden layer (the probes' default: the
    residual stream after every block of a transformer or ResNet, else every nonlinearity), on logged steps
    only; on the other steps each hook checks a flag and returns. The model, its gradients, buffers and modes and
    the global RNG are untouched. Definitions and thresholds: :mod:`lightning_interp.stats.norm_stats`.

    Logged through ``LightningModule.log`` (``on_step``, ``sync_dist=True``, any logger):

    * ``norm/<norm layer>/<stat>``: ``in_mean``, ``in_std``, ``out_mean``, ``out_std``, ``gamma_abs_mean``,
      ``beta_mean`` (affine layers), ``effective_gain`` = mean(|gamma| / sigma) with the sigma the layer
      divides by (batch statistics in train mode, running statistics in eval mode, per example — per token
      for ``(B, T, D)`` inputs — for LayerNorm/GroupNorm/RMSNorm; the root mean square, with the layer's
      ``eps`` or ``variance_epsilon``, for RMSNorm-like library classes, which ``T5LayerNorm`` is: the layer's
      own output decides whether a library ``*LayerNorm`` subtracts the mean; one whose output fits neither
      form is warned about once and gets NaN), and for BatchNorm ``running_mean_dist`` /
      ``running_std_ratio`` (running vs batch statistics);
    * ``norm/<hidden layer>/<stat>``: ``act_mean``, ``act_std`` (over every element: all tokens of a ``(B, T,
      D)`` block output, padding included); ``saturated_frac`` after Tanh/Sigmoid-like
      layers (``|a| > 0.99``; sigmoid ``< 0.01`` or ``> 0.99``); ``dead_frac`` after ReLU/ReLU6 (units never
      positive in the batch; a conv unit is a channel);
    * ``norm/total/effective_gain``, ``norm/total/dead_frac``, ``norm/total/saturated_frac``: means over
      layers;
    * ``norm/total/nonfinite_events``: logged steps whose activations held NaN/Inf (counted, warned once).

    With a TensorBoardLogger, every ``every_n_epochs`` on global rank 0: histograms ``norm/<hidden layer>/
    activations`` (a strided sample of at most ``histogram_samples`` values) and ``norm/<norm layer>/gamma``,
    and once a custom-scalars layout (``norm`` section: one chart per statistic with every layer).

    At the defaults, a model with neither a normalization layer nor a hidden layer gets one warning naming
    ``layers=`` and an idle callback; explicit ``layers`` that select no module fail in ``setup``. Hidden layers
    whose hooks never run (``nn.MultiheadAttention``'s ``out_proj``) are named in a warning once.

    Args:
        layers: the hidden layers (see :func:`~lightning_interp.layers.select_layers`); ``None``: the block
            outputs of a model with repeated blocks, else every nonlinearity's output. ``"input"`` is ignored.
        norm_types: extra module types to treat as normalization layers.
        every_n_epochs: histogram period in training epochs.
        histogram_samples: values kept per layer for a histogram.
        output_key: key or index of the tensor to use when a layer returns a tuple or dict.

    Example:
        >>> from lightning import Trainer
        >>> from lightning_interp.data import DigitsDataModule
        >>> from lightning_interp.models import DigitsCNN
        >>> monitor = NormStatsMonitor()
        >>> trainer = Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0, log_every_n_steps=2,
        ...                   callbacks=[monitor], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(DigitsCNN(norm="batch"), DigitsDataModule())
        >>> 0.0 < monitor.last["norm/net.norm1/effective_gain"] < 100.0
        True
    """

    STATE_VERSION = 1
    WHERE_TO_LOOK = "Custom Scalars, section `norm` (one chart per statistic); Histograms `norm/`"

    def __init__(
        self,
        layers: str | Sequence[str | type | Callable[..., bool]] | None = None,
        norm_types: Sequence[type] = (),
        every_n_epochs: int = 1,
        histogram_samples: int = 4096,
        output_key: str | int | None = None,
    ) -> None:
        super().__init__()
        self.layers = layers
        self.norm_types = check_module_types("norm_types", norm_types)
        self.every_n_epochs = check_positive_int("every_n_epochs", every_n_epochs)
        self.histogram_samples = check_positive_int("histogram_samples", histogram_samples)
        self.output_key = output_key
        self.norm_layers: list[Layer] = []
        self.hidden_layers: list[Layer] = []
        self.last: dict[str, float] = {}
        self.nonfinite_events = 0
        self._fired: set[str] = set()
        self._fits: dict[str, torch.Tensor] = {}
        self._active = False
        self._sampling = False
        self._sampled_epoch = -1
        self._calls: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._snapshots: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._samples: dict[str, torch.Tensor] = {}
        self._functional: dict[str, str] = {}

    @override
    def _config(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "norm_types": [t.__name__ for t in self.norm_types],
            "every_n_epochs": self.every_n_epochs,
            "histogram_samples": self.histogram_samples,
        }

    # ---- set-up
    # ----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.idle = None
        self.norm_layers = normalization_layers(pl_module, self.norm_types)
        self.hidden_layers = [layer for layer in select_layers(pl_module, self.layers) if not layer.is_input]
        if self.layers is not None and not self.hidden_layers:
            raise LightningInterpError(
                "Expected argument `layers` to select at least one module whose output NormStatsMonitor can "
                f"describe (the model input `input` is not one), but got {self.layers!r}."
            )
        if not self.norm_layers and not self.hidden_layers:
            self._go_idle(
                "nothing_to_watch",
                "found no normalization layer and no hidden layer (no repeated blocks, no nonlinearity module, "
                "fewer than two weight layers); pass `layers=` naming the modules whose outputs to describe, or "
                "`norm_types=` for normalization classes it does not recognise",
            )
        self._functional = called_functionally(pl_module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # registered here, not in setup: callbacks such as weight averaging deep-copy the model in their setup
        self._release()
        if self.idle:
            return
        for layer in self.norm_layers:
            self.hooks.forward_pre(layer.module, self._make_pre_hook(layer.name))
            self.hooks.forward(layer.module, self._make_norm_hook(layer.name))
        for layer in self.hidden_layers:
            self.hooks.forward(layer.module, self._make_hidden_hook(layer.name))
        if not self.norm_layers:
            rank_zero_info(
                "NormStatsMonitor: the model has no normalization layer; "
                "logging hidden-layer statistics only."
            )
        writer = tensorboard_writer(trainer, self.problems)
        if writer is not None:
            charts = {f"{stat}, every layer": [rf"norm/.*/{stat}$"] for stat in NORM_STATS + HIDDEN_STATS}
            add_custom_scalar_charts(writer, "norm", charts)

    # ---- hooks
    # -----------------------------------------------------------------------------------------------
    def _key(self, name: str, kind: str) -> str:
        call = self._calls[(kind, name)]
        self._calls[(kind, name)] = call + 1
        return name if call == 0 else f"{name}@{call}"

    def _make_pre_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self._active:
                # a train-mode BatchNorm forward updates its running statistics in place: keep the ones before
                # it
                self._snapshots[name] = snapshot_running_stats(module)

        return hook

    def _make_norm_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self._active:
                return
            key = self._key(name, "norm")
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            y = first_tensor(output, self.output_key)
            if x is None or y is None:
                self.problems.report(
                    "non_tensor", f"layer `{name}` has a non-tensor input or output; skipped"
                )
                return
            diagnostics: dict[str, torch.Tensor] = {}
            self._pending[key] = norm_layer_stats(module, x, y, self._snapshots.pop(name, None), diagnostics)
            if "fit_error" in diagnostics:
                self._fits[key] = diagnostics["fit_error"]

        return hook

    def _make_hidden_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not (self._active or self._sampling):
                return
            self._fired.add(name)
            key = self._key(name, "hidden")
            y = first_tensor(output, self.output_key)
            if y is None:
                self.problems.report(
                    "non_tensor", f"layer `{name}` returned {type(output).__name__}; skipped"
                )
                return
            if self._active:
                self._pending[key] = activation_stats(module, y)
            if self._sampling:
                self._samples[key] = histogram_sample(y, self.histogram_samples)

        return hook

    # ---- batches
    # ---------------------------------------------------------------------------------------------
    def _histograms_due(self, trainer: Trainer) -> bool:
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._calls.clear()
        self._pending, self._fits = {}, {}
        self._snapshots = {}
        self._fired = set()
        self._active = not self.idle and logged_step(trainer)
        # one histogram sample per due epoch: the first batch of the epoch
        self._sampling = self._histograms_due(trainer) and self._sampled_epoch != trainer.current_epoch
        if self._sampling:
            self._samples = {}
            self._sampled_epoch = trainer.current_epoch

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._sampling = False
        if not self._active:
            return
        self._active = False
        self._check_fired()
        pending, self._pending = self._pending, {}
        fits, self._fits = self._fits, {}
        tags: list[str] = []
        values: list[torch.Tensor] = []
        for layer, stats in pending.items():
            for stat, value in stats.items():
                tags.append(f"norm/{layer}/{stat}")
                values.append(value.reshape(()).to(torch.float32))
        for layer, fit in fits.items():
            tags.append(f"fit:{layer}")
            values.append(fit.reshape(()).to(torch.float32))
        if not values:
            return
        # one device-to-host transfer for every statistic of the step
        numbers = torch.stack([v.to(values[0].device) for v in values]).tolist()
        logged = dict(zip(tags, numbers))
        for layer in fits:
            if not logged.pop(f"fit:{layer}") <= FIT_TOLERANCE:  # NaN too
                logged[f"norm/{layer}/effective_gain"] = float("nan")
                self.problems.report(
                    "unknown_norm_form",
                    f"the output of normalization `{layer}` is neither g * (x - mean) / std (+ b) nor "
                    "g * x / rms (+ b); its effective_gain is logged as NaN",
                )
        if not all(math.isfinite(v) for t, v in logged.items() if not t.endswith("effective_gain")):
            self.nonfinite_events += 1
            self.problems.report(
                "nonfinite_activations",
                "activations held NaN/Inf; the step's statistics are logged as they are",
            )
        for stat in ("effective_gain", "dead_frac", "saturated_frac"):
            per_layer = [v for t, v in logged.items() if t.endswith("/" + stat) and not math.isnan(v)]
            present = any(t.endswith("/" + stat) for t in tags)
            if present:
                logged[f"norm/total/{stat}"] = sum(per_layer) / len(per_layer) if per_layer else float("nan")
        logged["norm/total/nonfinite_events"] = float(self.nonfinite_events)
        for tag, value in logged.items():
            pl_module.log(tag, value, on_step=True, on_epoch=False, sync_dist=True)
        self.last = logged

    def _check_fired(self) -> None:
        """Name, once, the hidden layers whose hooks did not run on this logged step."""
        silent = [layer.name for layer in self.hidden_layers if layer.name not in self._fired]
        if silent:
            self.problems.report("never_fired", never_ran_message(silent, self._functional) + "; no statistics for them")
        self._fired = set()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._histograms_due(trainer):
            return
        writer = tensorboard_writer(trainer, self.problems)
        if writer is None:
            self._samples = {}
            return
        step = trainer.global_step
        for key, sample in self._samples.items():
            finite = sample[torch.isfinite(sample)]
            if finite.numel():
                writer.add_histogram(f"norm/{key}/activations", finite.cpu(), step)
        # under a sharding strategy a weight outside the forward is this rank's shard: no gamma histogram then
        for layer in [] if sharded_strategy(trainer) else self.norm_layers:
            weight = getattr(layer.module, "weight", None)
            if isinstance(weight, torch.Tensor):
                gamma = weight.detach().float().reshape(-1)
                if torch.isfinite(gamma).all():
                    writer.add_histogram(f"norm/{layer.name}/gamma", gamma.cpu(), step)
        writer.flush()
        self._samples = {}

    @override
    def _release(self) -> None:
        super()._release()
        self._active = self._sampling = False
        self._pending, self._snapshots, self._samples, self._fits = {}, {}, {}, {}
        self._fired = set()

    # ---- state
    # -----------------------------------------------------------------------------------------------
    @override
    def _state(self) -> dict[str, Any]:
        return {"nonfinite_events": self.nonfinite_events}

    @override
    def _load_state(self, state: dict[str, Any]) -> None:
        self.nonfinite_events = int(state["nonfinite_events"])
