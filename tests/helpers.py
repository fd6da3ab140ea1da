"""Shared test utilities: short deterministic CPU fits and checks that a callback left no trace."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning import Callback, LightningModule

from lightning_interp.data import DigitsDataModule
from lightning_interp.hooks import count_hooks
from lightning_interp.models import DigitsCNN

__all__ = [
    "fit",
    "weights_of",
    "hook_free_copy",
    "assert_same_weights",
    "count_hooks",
    "quiet_trainer",
    "assert_hook_hygiene",
    "every_callback",
    "OrderedDigits",
    "TAG_FAMILIES",
]

#: the tag prefixes of the five callbacks: every scalar, image or histogram of ours starts with one of them
TAG_FAMILIES = ("probe/", "norm/", "gradflow/", "saliency/", "representer/")


def every_callback(representer_examples: int = 200) -> list[Callback]:
    """One instance of each of the package's callbacks at its most frequent setting (dumps every epoch, the
    randomization check on so every rank computes saliency maps), kept small enough for tests."""
    from lightning_interp.callbacks import (
        GradFlowMonitor,
        LinearProbeMonitor,
        NormStatsMonitor,
        RepresenterMonitor,
        SaliencyMonitor,
    )

    return [
        LinearProbeMonitor(),
        NormStatsMonitor(every_n_epochs=1),
        GradFlowMonitor(every_n_epochs=1),
        SaliencyMonitor(every_n_epochs=1, num_examples=4, randomization_check=True),
        RepresenterMonitor(every_n_epochs=1, max_train_examples=representer_examples, num_examples=4, sparse_pool=64),
    ]


class OrderedDigits(DigitsDataModule):
    """Digits without shuffling: a run resumed from a checkpoint sees the batches an uninterrupted run sees."""

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=False)


def quiet_trainer(callbacks: Sequence[Callback] = (), **kwargs: Any) -> L.Trainer:
    """A CPU Trainer without progress bar, summary or checkpoints; ``kwargs`` override."""
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return L.Trainer(callbacks=list(callbacks), **options)


def fit(
    callbacks: Sequence[Callback] = (),
    model_fn: Callable[[], LightningModule] = lambda: DigitsCNN(norm="batch", dropout=0.2),
    datamodule: L.LightningDataModule | None = None,
    seed: int = 0,
    **trainer_kwargs: Any,
) -> tuple[LightningModule, L.Trainer]:
    """Seed, build the model, fit; returns ``(model, trainer)``."""
    L.seed_everything(seed, verbose=False)
    model = model_fn()
    trainer = quiet_trainer(callbacks, **trainer_kwargs)
    trainer.fit(model, datamodule=datamodule or DigitsDataModule(batch_size=64))
    return model, trainer


def hook_free_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy without any module hook (deepcopy copies the monitors' hooks along), for reference computations."""
    import copy

    clone = copy.deepcopy(model)
    for module in clone.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    return clone


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (BatchNorm running statistics included), cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def assert_hook_hygiene(make_callback: Callable[[], Any], hooks_during_fit: int) -> None:
    """Two fits in a row keep ``hooks_during_fit`` hooks on the model while training and none afterwards; a fit
    that raises (an error, then a KeyboardInterrupt, which Lightning 2.6 turns into SystemExit) from a callback
    after the forward leaves the model and the callback without hooks."""
    import pytest

    model, callback, seen = DigitsCNN(), make_callback(), []

    class Count(Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            seen.append(count_hooks(pl_module))

    for _ in range(2):
        quiet_trainer([callback, Count()], max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(
            model, DigitsDataModule()
        )
        assert count_hooks(model) == 0 and len(callback.hooks) == 0
    assert seen[0] == seen[-1] == hooks_during_fit

    for error, expected in [(RuntimeError("raised on purpose"), RuntimeError), (KeyboardInterrupt(), SystemExit)]:

        class Raise(Callback):
            def on_train_batch_end(self, *args: Any) -> None:
                raise error

        model = DigitsCNN()
        callback = make_callback()
        with pytest.raises(expected):
            quiet_trainer([callback, Raise()], max_epochs=1, log_every_n_steps=1).fit(model, DigitsDataModule())
        assert count_hooks(model) == 0 and len(callback.hooks) == 0
