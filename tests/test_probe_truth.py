"""Probe curves that tell the truth: at every epoch, LinearProbeMonitor's validation reading against an offline
scikit-learn ``LogisticRegression`` fitted on that epoch's frozen activations (train split, scored on the
validation split), on models of several kinds.

The reference is computed here, independently of the package: its own forward hooks, its own 2x2 average pooling
of conv maps, its own StandardScaler + LogisticRegression, after each validation run (the weights the monitor's
reading was taken with).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning import Callback
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_interp.callbacks import LinearProbeMonitor
from lightning_interp.cli import TRANSFORMER_DEMO_SETTINGS
from lightning_interp.data import DigitsDataModule
from lightning_interp.models import ClassifierModule, DeepMLP, DigitsCNN, DigitsTransformer
from tests.helpers import quiet_trainer

EPOCHS = 6


def reduced(output: torch.Tensor) -> torch.Tensor:
    """The issue's "frozen (2x2-pooled) activations": conv maps average-pooled to 2x2 per channel, token sequences
    (B, T, D) averaged over the tokens (no padding here), flattened."""
    x = output.detach().float()
    if x.dim() == 4:
        x = F.adaptive_avg_pool2d(x, 2)
    elif x.dim() == 3:
        x = x.mean(dim=1)
    return x.flatten(1)


class OfflineReference(Callback):
    """After each validation run: eval-mode activations of the whole train and validation splits, one scikit-learn
    fit per layer on the train split, its accuracy on the validation split."""

    def __init__(self, monitor: LinearProbeMonitor, dm: DigitsDataModule) -> None:
        self.monitor, self.dm = monitor, dm
        self.scores: list[dict[str, float]] = []
        self._input_score: float | None = None

    def _features(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        store: dict[str, torch.Tensor] = {}
        handles = [
            layer.module.register_forward_hook(lambda m, a, out, n=layer.name: store.__setitem__(n, reduced(out).float().cpu()))
            for layer in self.monitor.resolved_layers
            if not layer.is_input
        ]
        try:
            with torch.no_grad():
                model(x.to(model.device))
        finally:
            for handle in handles:
                handle.remove()
        return store

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        was_training = pl_module.training
        pl_module.eval()
        (x_train, y_train), (x_val, y_val) = self.dm.train_dataset.tensors, self.dm.val_dataset.tensors
        train, val = self._features(pl_module, x_train), self._features(pl_module, x_val)
        pl_module.train(was_training)
        scores = {}
        for name in train:
            scaler = StandardScaler().fit(train[name].numpy())
            clf = LogisticRegression(max_iter=3000).fit(scaler.transform(train[name].numpy()), y_train.numpy())
            scores[name] = clf.score(scaler.transform(val[name].numpy()), y_val.numpy())
        if self._input_score is None:  # the pixels do not change from epoch to epoch: one fit
            scaler = StandardScaler().fit(x_train.flatten(1).numpy())
            clf = LogisticRegression(max_iter=3000).fit(scaler.transform(x_train.flatten(1).numpy()), y_train.numpy())
            self._input_score = clf.score(scaler.transform(x_val.flatten(1).numpy()), y_val.numpy())
        scores["input"] = self._input_score
        self.scores.append(scores)


class BatchNormDropoutCNN(ClassifierModule):
    """A conv net with BatchNorm and dropout between the probed layers (dropout changes train-mode activations)."""

    def __init__(self) -> None:
        super().__init__(lr=3e-3)
        self.net = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(1, 16, 3, padding=1), bn1=nn.BatchNorm2d(16), relu1=nn.ReLU(), drop1=nn.Dropout(0.2),
            conv2=nn.Conv2d(16, 32, 3, padding=1), bn2=nn.BatchNorm2d(32), relu2=nn.ReLU(), drop2=nn.Dropout2d(0.2),
            pool=nn.MaxPool2d(2), flatten=nn.Flatten(), fc1=nn.Linear(32 * 16, 64), bn3=nn.BatchNorm1d(64),
            relu3=nn.ReLU(), drop3=nn.Dropout(0.3), fc2=nn.Linear(64, 10),
        ))  # fmt: skip
        self.val_accuracy = MulticlassAccuracy(10, average="micro")


MODELS = {
    "cnn-batchnorm": lambda: DigitsCNN(norm="batch"),
    "cnn-layernorm": lambda: DigitsCNN(norm="layer"),
    "cnn-groupnorm": lambda: DigitsCNN(norm="group"),
    "cnn-none": lambda: DigitsCNN(norm="none"),
    "mlp-relu": lambda: DeepMLP(depth=6, width=64, activation="relu"),
    "mlp-tanh": lambda: DeepMLP(depth=6, width=64, activation="tanh"),
    "cnn-batchnorm-dropout": BatchNormDropoutCNN,
    # the transformer demo's model at its settings (12 blocks, lr 3e-3): Post-LN collapses there, the others train
    **{f"transformer-{norm}": (lambda norm=norm: DigitsTransformer(norm=norm, **TRANSFORMER_DEMO_SETTINGS))
       for norm in ("postln", "preln", "rmsnorm", "none")},
}


class FitIterations(Callback):
    """Hands the iterations of each frozen fit (``monitor.fit_iterations``) to ``on_fit`` (for the benchmark)."""

    def __init__(self, monitor: LinearProbeMonitor, on_fit) -> None:  # type: ignore[no-untyped-def]
        self.monitor, self.on_fit = monitor, on_fit

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_fit(list(self.monitor.fit_iterations.values()))


def fit_with_reference(model_fn, epochs: int = EPOCHS, on_fit=None, trainer_options=None, **options):  # type: ignore[no-untyped-def]
    """Fit ``model_fn()`` on digits with a LinearProbeMonitor (``options``) and the offline reference
    (``trainer_options``: e.g. the benchmark's accelerator and precision; a CPU Trainer when ``None``)."""
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule()
    monitor = LinearProbeMonitor(**options)
    reference = OfflineReference(monitor, dm)
    extra = [FitIterations(monitor, on_fit)] if on_fit is not None else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer([monitor, reference, *extra], max_epochs=epochs, **(trainer_options or {})).fit(
            model_fn(), datamodule=dm
        )
    return monitor, reference


@pytest.mark.slow
@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_epoch_matches_an_offline_fit(model_name):
    monitor, reference = fit_with_reference(MODELS[model_name])
    assert len(reference.scores) == EPOCHS
    assert set(monitor.history["val"]) == set(reference.scores[0])
    for epoch, offline in enumerate(reference.scores):
        for name, expected in offline.items():
            online = monitor.history["val"][name][epoch]
            gap = abs(online - expected)
            if epoch >= 2:
                assert gap <= 0.02, f"epoch {epoch + 1}, {name}: monitor {online:.3f} vs offline {expected:.3f}"
            if epoch == EPOCHS - 1:
                assert gap <= 0.015, f"final, {name}: monitor {online:.3f} vs offline {expected:.3f}"
