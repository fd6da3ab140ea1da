"""What every lightning-interp callback shares: hook release on teardown and on exceptions, one problem counter,
a ``state_key`` that includes the configuration, and versioned state."""

from __future__ import annotations

from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_interp._distributed import sharded_strategy
from lightning_interp._warnings import ProblemCounter
from lightning_interp.errors import LightningInterpError
from lightning_interp.hooks import HookManager
from lightning_interp.tensorboard import tensorboard_writer


class InterpCallback(Callback):
    """Base of the package's callbacks. Subclasses set ``STATE_VERSION`` and implement ``_config`` (the arguments
    that identify an instance), ``_state`` and ``_load_state``; they register hooks only through ``self.hooks``."""

    STATE_VERSION = 1
    #: one line for the run summary: which tags to open in TensorBoard and what they show
    WHERE_TO_LOOK = ""

    def __init__(self) -> None:
        super().__init__()
        self.hooks = HookManager()
        self.problems = ProblemCounter(type(self).__name__)
        #: why the callback does nothing in this fit (``None`` while it works); see :meth:`_go_idle`
        self.idle: str | None = None

    def _go_idle(self, kind: str, reason: str) -> None:
        """Do nothing for the rest of this fit, hooks removed, after one warning saying why and which argument to
        pass: a callback at its defaults never stops a user's fit on a model it finds nothing to watch on. (Explicit
        bad arguments still raise at construction or ``setup``.) Callers agree on it across DDP ranks first when the
        reason depends on a rank's own data."""
        self.idle = reason
        self._release()
        self.problems.report(kind, f"{reason}. It stays idle for the rest of this fit")

    # ---- configuration -------------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({args})"

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**{k: repr(v) for k, v in self._config().items()})

    # ---- the run summary -------------------------------------------------------------------------------------
    def _watched_layers(self) -> list[str]:
        """The layers this callback resolved in ``setup`` (for the run summary)."""
        found: list[str] = []
        for attribute in ("resolved_layers", "norm_layers", "hidden_layers"):
            found += [layer.name for layer in getattr(self, attribute, []) if layer.name not in found]
        return found

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # here rather than in on_fit_start: a resumed run has restored its global step by now
        ours = [cb for cb in trainer.callbacks if isinstance(cb, InterpCallback)]
        if ours and ours[0] is self:  # one summary per run, written by the first of our callbacks
            write_run_summary(trainer, pl_module, ours)

    # ---- strategies ------------------------------------------------------------------------------------------
    def _refuse_sharded(self, trainer: Trainer, why: str) -> None:
        """Raise a clear error under a strategy that shards parameters (FSDP, DeepSpeed, model parallel)."""
        name = sharded_strategy(trainer)
        if name is not None:
            raise LightningInterpError(
                f"{type(self).__name__} does not support {name}: {why}. Use it with strategy='ddp' (or one "
                "device), or remove it from `callbacks` for sharded runs; LinearProbeMonitor and NormStatsMonitor, "
                "which read only activations, are allowed there."
            )

    # ---- schedule ------------------------------------------------------------------------------------------
    @staticmethod
    def _epoch_dump_due(trainer: Trainer, every_n_epochs: int) -> bool:
        """A periodic dump is due at this training epoch's end: every ``every_n_epochs`` epochs, and at the last
        epoch the Trainer will run (so the end-of-fit dump can still log scalars; ``on_train_end`` may not)."""
        epoch = trainer.current_epoch + 1
        max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
        last = (max_epochs is not None and epoch >= max_epochs) or bool(trainer.should_stop) or (
            trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps
        )
        return epoch % every_n_epochs == 0 or last

    # ---- hooks ---------------------------------------------------------------------------------------------
    def _release(self) -> None:
        """Remove every hook this callback registered. Idempotent; called on teardown and on exceptions."""
        self.hooks.remove()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()

    # ---- state ---------------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {}

    def _load_state(self, state: dict[str, Any]) -> None:
        pass

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": self.STATE_VERSION, "problems": self.problems.state_dict(), **self._state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version") if isinstance(state_dict, dict) else None
        if version != self.STATE_VERSION:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint holds state version {version!r}, this version reads "
                f"{self.STATE_VERSION}; starting this callback afresh (the model and optimizer still resume)."
            )
            return
        try:
            self._load_state(state_dict)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            rank_zero_warn(
                f"{type(self).__name__}: could not restore its state from the checkpoint ({err}); starting afresh."
            )
            return
        self.problems.load_state_dict(state_dict.get("problems", {}))


class PeriodicDumpCallback(InterpCallback):
    """An InterpCallback whose expensive work (a "dump") runs every ``every_n_epochs`` training epochs and once at
    the end of fit. Subclasses set ``self.every_n_epochs``, implement ``_dump`` and record
    ``self._last_dump_step = trainer.global_step`` in it."""

    every_n_epochs: int = 1
    _last_dump_step: int | None = None

    def _dump(self, trainer: Trainer, pl_module: LightningModule, log_scalars: bool) -> None:
        raise NotImplementedError

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._epoch_dump_due(trainer, self.every_n_epochs):
            self._dump(trainer, pl_module, log_scalars=True)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._last_dump_step != trainer.global_step:
            self._dump(trainer, pl_module, log_scalars=False)  # Lightning allows no `log` call here


def write_run_summary(trainer: Trainer, pl_module: LightningModule, callbacks: list[InterpCallback]) -> None:
    """One page of text per run (TensorBoard tag ``summary/run``): the model, every lightning-interp callback with
    its configuration and resolved layers, and where to look."""
    writer = tensorboard_writer(trainer)
    if writer is None:
        return
    lines = [
        f"**Model** `{type(pl_module).__name__}`, {sum(p.numel() for p in pl_module.parameters()):,} parameters; "
        f"max_epochs {trainer.max_epochs}, log_every_n_steps {trainer.log_every_n_steps}, "
        f"{trainer.world_size} process(es).",
        "",
        "| callback | configuration | layers | where to look |",
        "|---|---|---|---|",
    ]
    for callback in callbacks:
        layers = callback._watched_layers()
        shown = ", ".join(f"`{name}`" for name in layers[:30]) + (" ..." if len(layers) > 30 else "")
        config = repr(callback).replace("|", "\\|")
        lines.append(f"| {type(callback).__name__} | `{config}` | {shown or '-'} | {callback.WHERE_TO_LOOK} |")
    lines += ["", "Start TensorBoard with `--samples_per_plugin images=1000` to keep every epoch's images."]
    writer.add_text("summary/run", "\n".join(lines), global_step=trainer.global_step)
    writer.flush()
