"""LinearProbeMonitor: zero interference, hooks, bad input, state, host synchronisation, labels from elsewhere.

Its quality against scikit-learn at every epoch: tests/test_probe_truth.py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from lightning import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_interp.callbacks import LinearProbeMonitor
from lightning_interp.data import DigitsDataModule
from lightning_interp.errors import LightningInterpError
from lightning_interp.hooks import ActivationCapture
from lightning_interp.models import ClassifierModule, DeepMLP, DigitsCNN
from tests.helpers import assert_same_weights, count_hooks, fit, quiet_trainer, weights_of


@pytest.mark.parametrize("mode", ["frozen", "online"])
def test_zero_interference_bitwise(mode):
    reference, _ = fit([], max_epochs=2)
    watched, _ = fit([LinearProbeMonitor(fit=mode)], max_epochs=2)
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
    with pytest.raises(LightningInterpError, match="`fit`"):
        LinearProbeMonitor(fit="sgd")
    with pytest.raises(LightningInterpError, match="`num_classes`"):
        LinearProbeMonitor(num_classes=1)
    with pytest.raises(LightningInterpError, match="`fit_examples`"):
        LinearProbeMonitor(fit_examples=0)
    with pytest.raises(LightningInterpError, match="`c`"):
        LinearProbeMonitor(c=0)
    with pytest.raises(LightningInterpError, match="`view`"):
        LinearProbeMonitor(view="first")
    with pytest.raises(LightningInterpError, match="`probe_dataloader`"):
        LinearProbeMonitor(probe_dataloader=5)
    with pytest.raises(LightningInterpError, match="`sequence_reduction`"):
        LinearProbeMonitor(sequence_reduction="max")


class RegressionTargets(DigitsDataModule):
    def train_dataloader(self):
        x, y = self.train_dataset.tensors
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y.float()), batch_size=64)


class TolerantCNN(DigitsCNN):
    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1] if len(batch) > 1 else None
        return self(x).logsumexp(1).mean()


def test_float_targets_at_defaults_warn_once_and_the_monitor_idles():
    monitor = LinearProbeMonitor()
    model = TolerantCNN()
    with pytest.warns(UserWarning, match="integer class indices.*stays idle") as record:
        trainer = quiet_trainer([monitor], max_epochs=2)
        trainer.fit(model, RegressionTargets())
    assert sum("integer class indices" in str(w.message) for w in record) == 1
    assert trainer.current_epoch == 2 and monitor.idle and monitor.history == {"train": {}, "val": {}}
    assert count_hooks(model) == 0 and len(monitor.hooks) == 0


def test_float_targets_from_an_explicit_adapter_raise_at_the_first_batch():
    monitor = LinearProbeMonitor(batch_adapter=lambda batch: (batch[0], batch[1].float()))
    with pytest.raises(LightningInterpError, match="integer class indices.*`batch_adapter`"):
        quiet_trainer([monitor], max_epochs=1).fit(TolerantCNN(), DigitsDataModule())


class NoLinearCNN(ClassifierModule):
    """A fully convolutional classifier: a 1x1 conv head and global pooling, no nn.Linear."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 10, 1),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip
        from torchmetrics.classification import MulticlassAccuracy

        self.val_accuracy = MulticlassAccuracy(10, average="micro")


def test_a_model_without_linear_layer_at_defaults_idles_and_num_classes_makes_it_work():
    idle = LinearProbeMonitor()
    with pytest.warns(UserWarning, match="`num_classes=`.*stays idle"):
        quiet_trainer([idle], max_epochs=1).fit(NoLinearCNN(), DigitsDataModule())
    assert idle.idle and idle.history == {"train": {}, "val": {}}
    working = LinearProbeMonitor(num_classes=10)
    quiet_trainer([working], max_epochs=1).fit(NoLinearCNN(), DigitsDataModule())
    assert working.idle is None and working.history["val"]["net.1"][-1] > 0.5


class InputsOnly(DigitsDataModule):
    def train_dataloader(self):
        x, _ = self.train_dataset.tensors
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64)


def test_batch_without_targets_names_batch_adapter_and_idles():
    monitor = LinearProbeMonitor()
    with pytest.warns(UserWarning, match="batch_adapter.*stays idle"):
        trainer = quiet_trainer([monitor], max_epochs=1)
        trainer.fit(TolerantCNN(), InputsOnly())
    assert trainer.current_epoch == 1 and monitor.idle


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


def test_online_nan_activations_skip_the_probe_step_and_keep_weights_finite():
    monitor = LinearProbeMonitor(layers=["net.relu1", "net.relu4"], fit="online")
    with pytest.warns(UserWarning, match="NaN") as record:
        quiet_trainer([monitor], max_epochs=2).fit(NaNHiddenLayer(), DigitsDataModule())
    assert sum("NaN" in str(w.message) for w in record) == 1
    steps = 2 * 23  # relu1 is NaN on every third training call: 15 of the 46 steps
    assert monitor.problems.counts["nan_activations"] == steps // 3
    # a skipped step leaves the probe's Adam step count alone: relu1 took 31 steps, relu4 all 46
    assert int(monitor.bank.moments["net.relu1"]["step"]) == steps - steps // 3
    assert int(monitor.bank.moments["net.relu4"]["step"]) == steps
    for probe in monitor.bank.probes.values():
        assert all(torch.isfinite(t).all() for t in probe.state_dict().values())
    assert monitor.history["val"]["net.relu1"][-1] > 0.5


class NaNReLUInEvalMode(nn.ReLU):
    def forward(self, x):
        out = super().forward(x)
        if not self.training and x.shape[0] > 100:
            out = out.clone()
            out[:100] = float("nan")
        return out


class NaNInEvalMode(NaNHiddenLayer):
    """relu1 is NaN for the first 100 examples of every eval-mode forward of more than 100 (the probes' own pass
    sees them); the network itself sees them replaced by zeros."""

    def __init__(self):
        super().__init__()
        self.net.relu1 = NaNReLUInEvalMode()


def test_frozen_fit_leaves_out_nan_rows_and_counts_them():
    monitor = LinearProbeMonitor(layers=["net.relu1", "net.relu4"])
    with pytest.warns(UserWarning, match="NaN"):
        quiet_trainer([monitor], max_epochs=2, limit_val_batches=0).fit(NaNInEvalMode(), DigitsDataModule())
    # 1,437 training examples in batches of 256: 6 batches, each with 100 NaN rows, in each of 2 fits
    assert monitor.problems.counts["nan_activations"] == 2 * 6 * 100
    assert all(torch.isfinite(t).all() for p in monitor.bank.probes.values() for t in p.state_dict().values())
    assert monitor.history["train"]["net.relu1"][-1] > 0.9


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


@pytest.mark.parametrize("mode", ["frozen", "online"])
def test_state_dict_round_trip(mode):
    monitor = LinearProbeMonitor(fit=mode)
    fit([monitor], max_epochs=2)
    state = monitor.state_dict()
    fresh = LinearProbeMonitor(fit=mode)
    fresh.load_state_dict(state)
    assert fresh.history == monitor.history
    fresh.setup(None, DigitsCNN(), "fit")
    fresh.bank.load_state_dict(fresh._pending_state)
    for name, probe in monitor.bank.probes.items():
        for key, value in probe.state_dict().items():
            assert torch.equal(value, fresh.bank.probes[name].state_dict()[key])
    assert fresh.bank.moments.keys() == monitor.bank.moments.keys()
    assert (len(monitor.bank.moments) == 5) == (mode == "online")
    for name, state in monitor.bank.moments.items():
        assert all(torch.equal(v, fresh.bank.moments[name][k]) for k, v in state.items())


@pytest.mark.parametrize("mode", ["frozen", "online"])
def test_resume_continues_bitwise(tmp_path, mode):
    """3 epochs in one go against 2 epochs + resume for 1: the same history and bitwise the same probes (the
    online mode's Adam moments and step counts included)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.helpers import OrderedDigits

    model_fn = lambda: DigitsCNN(norm="batch", dropout=0.0)  # noqa: E731 - dropout's RNG is not checkpointed
    whole = LinearProbeMonitor(fit=mode)
    fit([whole], model_fn=model_fn, max_epochs=3, datamodule=OrderedDigits())
    first = LinearProbeMonitor(fit=mode)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit([first, ckpt], model_fn=model_fn, max_epochs=2, enable_checkpointing=True, datamodule=OrderedDigits())
    resumed = LinearProbeMonitor(fit=mode)
    quiet_trainer([resumed], max_epochs=3).fit(model_fn(), OrderedDigits(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.history == whole.history and len(resumed.history["val"]["net.relu4"]) == 3
    a, b = whole.bank.state_dict(), resumed.bank.state_dict()
    assert a["names"] == b["names"] and bool(a["moments"]) == (mode == "online")
    for name in a["names"]:
        assert all(torch.equal(v, b["probes"][name][k]) for k, v in a["probes"][name].items()), name
        assert all(torch.equal(v, b["moments"][name][k]) for k, v in a["moments"].get(name, {}).items()), name


def test_foreign_state_version_warns_and_starts_afresh():
    monitor = LinearProbeMonitor()
    with pytest.warns(UserWarning, match="state version"):
        monitor.load_state_dict({"version": 99, "history": {}})
    assert monitor.history == {"train": {}, "val": {}}


def test_state_key_includes_configuration():
    assert LinearProbeMonitor(lr=0.1).state_key != LinearProbeMonitor(lr=0.2).state_key


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


def _load_example(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_self_supervised_example_probe_curves_rise():
    """The SimCLR-style example (two augmented views, no label in the loss): the probes of the encoder's dense
    layer and of the projector's hidden layer rise as the representation learns."""
    history = _load_example("simclr_probes").run(epochs=4)
    for layer in ("encoder.9", "projector.1"):
        curve = history[layer]
        assert len(curve) == 4 and curve[-1] >= curve[0] + 0.05 and curve[-1] > 0.9, f"{layer}: {curve}"


class UnlabelledDigits(DigitsDataModule):
    """Training batches are dicts with the images only; the labels live in separate loaders for the probes."""

    def train_dataloader(self):
        x, _ = self.train_dataset.tensors
        return torch.utils.data.DataLoader([{"image": image} for image in x], batch_size=64)

    def val_dataloader(self):
        return []


class ReconstructingCNN(DigitsCNN):
    def training_step(self, batch, batch_idx):
        return self(batch["image"]).square().mean()  # any label-free loss


def test_labels_from_a_probe_dataloader_when_training_batches_carry_none():
    dm = DigitsDataModule()
    dm.setup("fit")
    labelled = torch.utils.data.DataLoader(dm.train_dataset, batch_size=128)
    held_out = torch.utils.data.DataLoader(dm.val_dataset, batch_size=128)
    monitor = LinearProbeMonitor(num_classes=10, probe_dataloader=labelled, probe_val_dataloader=held_out)
    quiet_trainer([monitor], max_epochs=2, limit_val_batches=0).fit(ReconstructingCNN(), UnlabelledDigits())
    assert len(monitor.history["val"]["input"]) == 2 and monitor.history["val"]["input"][-1] > 0.9
    assert len(monitor.history["train"]["net.relu2"]) == 2


class LabelsUnderAnotherKey(DigitsDataModule):
    def train_dataloader(self):
        x, y = self.train_dataset.tensors
        return torch.utils.data.DataLoader([{"image": a, "digit": b} for a, b in zip(x, y)], batch_size=64)

    def val_dataloader(self):
        x, y = self.val_dataset.tensors
        return torch.utils.data.DataLoader([{"image": a, "digit": b} for a, b in zip(x, y)], batch_size=128)


class DictCNN(DigitsCNN):
    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch["image"]), batch["digit"])

    def validation_step(self, batch, batch_idx):
        self(batch["image"])


@pytest.mark.parametrize("how", ["target_key", "targets_fn"])
def test_labels_from_a_batch_key_or_function(how):
    option = {"target_key": "digit"} if how == "target_key" else {"targets_fn": lambda batch: batch["digit"]}
    monitor = LinearProbeMonitor(num_classes=10, **option)
    quiet_trainer([monitor], max_epochs=2).fit(DictCNN(), LabelsUnderAnotherKey())
    assert monitor.history["val"]["net.relu3"][-1] > 0.9


def test_num_classes_is_required_when_labels_come_from_elsewhere():
    with pytest.raises(LightningInterpError, match="Pass `num_classes=`"):
        quiet_trainer([LinearProbeMonitor(target_key="digit")], max_epochs=1).fit(DictCNN(), LabelsUnderAnotherKey())


class UnusedReLU(DigitsCNN):
    """Registers a ReLU its forward never calls, and applies another one functionally."""

    def __init__(self):
        super().__init__()
        self.spare = nn.ReLU()


def test_layers_that_never_run_are_said_and_not_probed():
    monitor = LinearProbeMonitor()
    with pytest.warns(UserWarning, match="never ran") as record:
        quiet_trainer([monitor], max_epochs=1).fit(UnusedReLU(), DigitsDataModule())
    assert sum("never ran" in str(w.message) for w in record) == 1
    assert monitor.not_fired == ["spare"] and any("spare" in str(w.message) for w in record)
    assert [layer.name for layer in monitor.resolved_layers] == ["input", "net.relu1", "net.relu2", "net.relu3",
                                                                 "net.relu4"]  # fmt: skip
    assert set(monitor.history["val"]) == {layer.name for layer in monitor.resolved_layers}


def test_validate_after_fit_reads_the_fitted_probes():
    monitor = LinearProbeMonitor()
    model, trainer = fit([monitor], max_epochs=1)
    after_fit = monitor.history["val"]["net.relu3"][-1]
    trainer.validate(model, DigitsDataModule(), verbose=False)
    assert monitor.history["val"]["net.relu3"][-1] == pytest.approx(after_fit, abs=1e-9)
    assert count_hooks(model) == 0
