"""What every lightning-interp callback shares: hook release on teardown and on exceptions, one problem counter,
a ``state_key`` that includes the configuration, and versioned state."""

from __future__ import annotations

from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_interp._warnings import ProblemCounter
from lightning_interp.hooks import HookManager


class InterpCallback(Callback):
    """Base of the package's callbacks. Subclasses set ``STATE_VERSION`` and implement ``_config`` (the arguments
    that identify an instance), ``_state`` and ``_load_state``; they register hooks only through ``self.hooks``."""

    STATE_VERSION = 1

    def __init__(self) -> None:
        super().__init__()
        self.hooks = HookManager()
        self.problems = ProblemCounter(type(self).__name__)

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
