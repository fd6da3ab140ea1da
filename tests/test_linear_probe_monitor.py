"""LinearProbeMonitor: quality against scikit-learn, zero interference, hooks, bad input, state."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from lightning import Callback
from lightning.pytorch.loggers import CSVLogger
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from lightning_interp.callbacks import LinearProbeMonitor
from lightning_interp.data import DigitsDataModule
from lightning_interp.errors import LightningInterpError
from lightning_interp.hooks import ActivationCapture
from lightning_interp.models import ClassifierModule, DeepMLP, DigitsCNN
from tests.helpers import assert_same_weights, count_hooks, fit, quiet_trainer, weights_of


def frozen_features(model, monitor, dataset):
    """Reduced activations of the trained, frozen model (eval mode), captured independently of the monitor."""
    capture = ActivationCapture(monitor.resolved_layers, monitor.reducer)
    capture.attach()
    capture.active = True
    x, y = dataset.tensors
    model.eval()
    with torch.no_grad():
        model(x)
    capture.put("input", x)
    feats = dict(capture.activations)
    capture.detach()
    return feats, y.numpy()


@pytest.mark.parametrize(
    "model_fn",
    [lambda: DigitsCNN(norm="batch"), lambda: DeepMLP(depth=8, width=64, norm="batch", activation="relu")],
    ids=["digits_cnn", "deep_mlp"],
)
def test_online_probes_match_offline_logistic_regression(model_fn):
    monitor = LinearProbeMonitor()
    dm = DigitsDataModule()
    model, _ = fit([monitor], model_fn=model_fn, datamodule=dm, max_epochs=12)
    train_feats, y_train = frozen_features(model, monitor, dm.train_dataset)
    val_feats, y_val = frozen_features(model, monitor, dm.val_dataset)
    assert set(monitor.history["val"]) == set(train_feats)
    for name in train_feats:
        scaler = StandardScaler().fit(train_feats[name].numpy())
        clf = LogisticRegression(max_iter=3000).fit(scaler.transform(train_feats[name].numpy()), y_train)
        offline = clf.score(scaler.transform(val_feats[name].numpy()), y_val)
        online = monitor.history["val"][name][-1]
        assert online >= offline - 0.015, f"{name}: online {online:.3f} vs offline {offline:.3f}"


def test_zero_interference_bitwise():
    reference, _ = fit([], max_epochs=2)
    watched, _ = fit([LinearProbeMonitor()], max_epochs=2)
    assert_same_weights(weights_of(reference), weights_of(watched))
    ref_grads = [p.grad for p in reference.parameters()]
    got_grads = [p.grad for p in watched.parameters()]
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(ref_grads, got_grads))


class Boom(Exception):
    pass


class RaisingCNN(DigitsCNN):
    def __init__(self, exc: type[BaseException], at_step: int = 3) -> None:
        super().__init__()
        self.exc, self.at_step = exc, at_step

    def training_step(self, batch, batch_idx):
        if batch_idx == self.at_step:
            raise self.exc("raised on purpose")
        return super().training_step(batch, batch_idx)


def test_hooks_removed_after_fit_raise_interrupt_and_two_fits():
    model = DigitsCNN()
    before = count_hooks(model)
    monitor = LinearProbeMonitor()
    quiet_trainer([monitor], max_epochs=1, limit_train_batches=3, limit_val_batches=1).fit(model, DigitsDataModule())
    assert count_hooks(model) == before
    quiet_trainer([monitor], max_epochs=1, limit_train_batches=3, limit_val_batches=1).fit(model, DigitsDataModule())
    assert count_hooks(model) == before and len(monitor.hooks) == 0

    raising = RaisingCNN(Boom)
    with pytest.raises(Boom, match="raised on purpose"):
        quiet_trainer([LinearProbeMonitor()], max_epochs=1).fit(raising, DigitsDataModule())
    assert count_hooks(raising) == 0

    interrupted = RaisingCNN(KeyboardInterrupt)
    monitor = LinearProbeMonitor()
    with pytest.raises(SystemExit):  # Lightning 2.6 turns the interrupt into a graceful shutdown and SystemExit(1)
        quiet_trainer([monitor], max_epochs=1).fit(interrupted, DigitsDataModule())
    assert count_hooks(interrupted) == 0 and len(monitor.hooks) == 0


def test_bad_layer_pattern_fails_at_setup():
    with pytest.raises(LightningInterpError, match="matches nothing"):
        quiet_trainer([LinearProbeMonitor(layers=["nope*"])], max_epochs=1).fit(DigitsCNN(), DigitsDataModule())


def test_bad_arguments_fail_at_construction():
    with pytest.raises(LightningInterpError, match="`lr`"):
        LinearProbeMonitor(lr=0)
    with pytest.raises(LightningInterpError, match="`refit`"):
        LinearProbeMonitor(refit="sgd")
    with pytest.raises(LightningInterpError, match="`num_classes`"):
        LinearProbeMonitor(num_classes=1)


class RegressionTargets(DigitsDataModule):
    def train_dataloader(self):
        x, y = self.train_dataset.tensors
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y.float()), batch_size=64)


class TolerantCNN(DigitsCNN):
    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1] if len(batch) > 1 else None
        return self(x).logsumexp(1).mean()


def test_float_targets_give_a_clear_error_at_the_first_batch():
    with pytest.raises(LightningInterpError, match="integer class indices"):
        quiet_trainer([LinearProbeMonitor()], max_epochs=1).fit(TolerantCNN(), RegressionTargets())


class InputsOnly(DigitsDataModule):
    def train_dataloader(self):
        x, _ = self.train_dataset.tensors
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64)


def test_batch_without_targets_names_batch_adapter():
    with pytest.raises(LightningInterpError, match="batch_adapter"):
        quiet_trainer([LinearProbeMonitor()], max_epochs=1).fit(TolerantCNN(), InputsOnly())


class TupleLayer(nn.Module):
    def forward(self, x):
        return "summary"  # a layer whose output is not a tensor


class NonTensorLayerModel(ClassifierModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.odd = TupleLayer()
        from torchmetrics.classification import MulticlassAccuracy

        self.val_accuracy = MulticlassAccuracy(10, average="micro")

    def forward(self, x):
        self.odd(x)
        return self.net(x)


def test_non_tensor_layer_is_skipped_with_one_warning():
    monitor = LinearProbeMonitor(layers=["odd", "net.2"])
    with pytest.warns(UserWarning, match="not a tensor") as record:
        quiet_trainer([monitor], max_epochs=1, limit_val_batches=2).fit(NonTensorLayerModel(), DigitsDataModule())
    assert sum("not a tensor" in str(w.message) for w in record) == 1
    assert monitor.problems.counts["non_tensor_output"] > 1
    assert "net.2" in monitor.history["val"] and "odd" not in monitor.history["val"]


class NaNEveryThirdCall(nn.ReLU):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = super().forward(x)
        return out + float("nan") if self.training and self.calls % 3 == 0 else out


class NaNHiddenLayer(DigitsCNN):
    """relu1 emits NaN on every third training call; the network itself sees it replaced by zeros."""

    def __init__(self):
        super().__init__()
        self.net.relu1 = NaNEveryThirdCall()

    def forward(self, x):
        return self.net[3:](torch.nan_to_num(self.net[:3](x)))


def test_nan_activations_skip_the_probe_step_and_keep_weights_finite():
    monitor = LinearProbeMonitor(layers=["net.relu1", "net.relu4"])
    with pytest.warns(UserWarning, match="NaN") as record:
        quiet_trainer([monitor], max_epochs=2).fit(NaNHiddenLayer(), DigitsDataModule())
    assert sum("NaN" in str(w.message) for w in record) == 1
    assert monitor.problems.counts["nan_activations"] > 5
    for probe in monitor.bank.probes.values():
        assert all(torch.isfinite(t).all() for t in probe.state_dict().values())
    assert monitor.history["val"]["net.relu1"][-1] > 0.5


def test_logger_false_and_csv_logger_get_scalars(tmp_path):
    monitor = LinearProbeMonitor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, trainer = fit([monitor], max_epochs=1, logger=CSVLogger(tmp_path, name="csv", version=0))
    assert sum("no TensorBoardLogger" in str(w.message) for w in caught) == 1
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "probe/val_acc/net.relu4" in header and "probe/train_acc/input" in header
    assert "probe/val_acc/net.relu4" in trainer.callback_metrics


def test_no_validation_loop_still_logs_training_accuracy():
    monitor = LinearProbeMonitor()
    _, trainer = fit([monitor], max_epochs=2, limit_val_batches=0)
    assert len(monitor.history["train"]["net.relu4"]) == 2 and monitor.history["val"] == {}


def test_state_dict_round_trip():
    monitor = LinearProbeMonitor()
    fit([monitor], max_epochs=2)
    state = monitor.state_dict()
    fresh = LinearProbeMonitor()
    fresh.load_state_dict(state)
    assert fresh.history == monitor.history
    fresh.setup(None, DigitsCNN(), "fit")
    fresh.bank.load_state_dict(fresh._pending_state)
    for name, probe in monitor.bank.probes.items():
        for key, value in probe.state_dict().items():
            assert torch.equal(value, fresh.bank.probes[name].state_dict()[key])
    assert fresh.bank.optimizer.state_dict()["state"].keys() == monitor.bank.optimizer.state_dict()["state"].keys()


def test_resume_from_checkpoint_continues_history(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    first = LinearProbeMonitor()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit([first, ckpt], max_epochs=2, enable_checkpointing=True)
    resumed = LinearProbeMonitor()
    L_trainer = quiet_trainer([resumed], max_epochs=3)
    L_trainer.fit(DigitsCNN(norm="batch", dropout=0.2), DigitsDataModule(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert len(resumed.history["val"]["net.relu4"]) == 3
    assert resumed.history["val"]["net.relu4"][:2] == first.history["val"]["net.relu4"]


def test_foreign_state_version_warns_and_starts_afresh():
    monitor = LinearProbeMonitor()
    with pytest.warns(UserWarning, match="state version"):
        monitor.load_state_dict({"version": 99, "history": {}})
    assert monitor.history == {"train": {}, "val": {}}


def test_state_key_includes_configuration():
    assert LinearProbeMonitor(lr=0.1).state_key != LinearProbeMonitor(lr=0.2).state_key


def test_lbfgs_refit_mode_reaches_offline_accuracy_quickly():
    monitor = LinearProbeMonitor(refit="lbfgs", layers=["input"])
    fit([monitor], max_epochs=2)
    assert monitor.history["val"]["input"][-1] > 0.93  # offline logistic regression on pixels: ~0.97


def test_probe_training_leaves_global_rng_alone():
    monitor = LinearProbeMonitor()
    monitor.setup(None, DigitsCNN(), "fit")
    state = torch.random.get_rng_state()
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    monitor.bank.train_step({"input": x.flatten(1)}, torch.arange(8))
    assert torch.equal(state, torch.random.get_rng_state())


def test_creating_probes_does_not_touch_the_global_rng():
    from lightning_interp.probes import LinearProbe

    state = torch.random.get_rng_state()
    LinearProbe(100, 10, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
