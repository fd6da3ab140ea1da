"""RepresenterMonitor on a real CPU Trainer: zero interference, hook hygiene, bad input, artifacts."""

from __future__ import annotations

import glob
import os
from collections import OrderedDict

import lightning as L
import pytest
import torch
from helpers import assert_same_weights, count_hooks, fit, quiet_trainer, weights_of
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_interp.callbacks import RepresenterMonitor
from lightning_interp.data import DigitsDataModule
from lightning_interp.errors import LightningInterpError
from lightning_interp.models import ClassifierModule, DigitsCNN


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _monitor(**kwargs) -> RepresenterMonitor:
    options = {"every_n_epochs": 1, "max_train_examples": 300, "num_examples": 3, "k": 2, "sparse_pool": 32}
    options.update(kwargs)
    return RepresenterMonitor(**options)


def test_zero_interference_bitwise():
    plain, _ = fit([], limit_train_batches=4, limit_val_batches=1)
    watched, _ = fit([_monitor()], limit_train_batches=4, limit_val_batches=1)
    assert_same_weights(weights_of(plain), weights_of(watched))


def test_modes_and_grads_restored():
    monitor = _monitor()
    model = DigitsCNN(norm="batch", dropout=0.2)
    dm = DigitsDataModule(batch_size=64)
    trainer = quiet_trainer([monitor], max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, dm)
    model.train()
    model.net.norm1.eval()  # a mixed state must come back exactly
    before = {name: m.training for name, m in model.named_modules()}
    buffers = weights_of(model)
    for p in model.parameters():
        p.grad = None
    monitor.on_train_start(trainer, model)  # hooks again (fit's teardown removed them), then one more dump
    try:
        monitor._dump(trainer, model, log_scalars=False)
    finally:
        monitor._release()
    assert not monitor.problems.counts.get("dump_failed")
    assert {name: m.training for name, m in model.named_modules()} == before
    assert_same_weights(buffers, weights_of(model))
    assert all(p.grad is None for p in model.parameters())
    assert monitor.dumps >= 2


def test_hooks_removed_after_fit_and_refit():
    model = DigitsCNN()
    before = count_hooks(model)
    monitor = _monitor()
    dm = DigitsDataModule(batch_size=64)
    for _ in range(2):
        quiet_trainer([monitor], max_epochs=1, limit_train_batches=2, limit_val_batches=1).fit(model, dm)
        assert count_hooks(model) == before
    assert len(monitor.hooks) == 0


class _Boom(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:
            raise RuntimeError("boom")


def test_hooks_removed_after_raising_fit():
    model = DigitsCNN()
    before = count_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        quiet_trainer([_monitor(), _Boom()], max_epochs=1, limit_val_batches=1).fit(model, DigitsDataModule())
    assert count_hooks(model) == before


class _NoLinear(ClassifierModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten())
        from torchmetrics.classification import MulticlassAccuracy

        self.val_accuracy = MulticlassAccuracy(10, average="micro")


def test_model_without_linear_warns_names_layer_and_stays_idle():
    """A default-configured monitor never stops a fit: one warning naming `layer=`, no hook, no dump."""
    monitor, model, seen = _monitor(), _NoLinear(), []

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(count_hooks(pl_module))

    with pytest.warns(UserWarning, match="no nn.Linear.*`layer=`") as caught:
        trainer = quiet_trainer([monitor, Count()], max_epochs=2, limit_train_batches=2, limit_val_batches=1)
        trainer.fit(model, DigitsDataModule())
    assert sum("RepresenterMonitor" in str(w.message) for w in caught) == 1
    assert trainer.current_epoch == 2 and monitor.dumps == 0 and monitor.idle is not None
    assert seen and set(seen) == {0} and count_hooks(model) == 0
    assert "representer/stationarity" not in trainer.callback_metrics


def test_layer_not_linear_fails_clearly():
    with pytest.raises(LightningInterpError, match="`layer`.*nn.Linear"):
        quiet_trainer([_monitor(layer="net.conv1")], max_epochs=1, limit_train_batches=1).fit(
            DigitsCNN(), DigitsDataModule()
        )
    with pytest.raises(LightningInterpError, match="`layer`.*net.fc2"):
        quiet_trainer([_monitor(layer="net.nope")], max_epochs=1, limit_train_batches=1).fit(
            DigitsCNN(), DigitsDataModule()
        )
    with pytest.raises(LightningInterpError, match="`every_n_epochs`"):
        RepresenterMonitor(every_n_epochs=0)


def test_shuffling_loader_gets_own_ordered_pass():
    """The training loader shuffles; the monitor's features follow dataset order, so alpha row i belongs to
    dataset item i: check against features and softmax outputs computed by hand in that order."""
    monitor = _monitor(max_train_examples=None)
    dm = DigitsDataModule(batch_size=64)
    model, trainer = fit([monitor], model_fn=lambda: DigitsCNN(norm="batch"), datamodule=dm, max_epochs=1,
                         limit_train_batches=3, limit_val_batches=1)  # fmt: skip
    assert trainer.train_dataloader.sampler.__class__.__name__ == "RandomSampler"
    last = monitor.last
    assert torch.equal(last["indices"], torch.arange(len(dm.train_dataset)))
    assert torch.equal(last["labels"], dm.train_dataset.tensors[1])
    model.eval()
    with torch.no_grad():
        logits = model(dm.train_dataset.tensors[0])
    assert torch.equal(last["predicted"], logits.argmax(1))
    # alpha = (p - q) / (2 lam n) sums to zero over classes for every row, and the refit agrees with the model
    assert float(last["alpha"].sum(1).abs().max()) < 1e-6
    assert last["stationarity"] <= 1e-9 and last["decomposition_residual"] <= 1e-6


def test_artifacts_written(tmp_path):
    monitor = _monitor()
    logger = TensorBoardLogger(str(tmp_path), name="run")
    fit([monitor], max_epochs=2, limit_train_batches=3, limit_val_batches=1, logger=logger)
    files = sorted(
        os.path.basename(p) for p in glob.glob(os.path.join(logger.log_dir, "representer_epoch*.pt"))
    )
    assert files == ["representer_epoch0.pt", "representer_epoch1.pt"]
    saved = torch.load(os.path.join(logger.log_dir, "representer_epoch1.pt"), weights_only=False)
    assert saved["alpha"].shape == (300, 10) and saved["indices"].shape == (300,)
    assert saved["suspects"]["indices"].shape == (20,)
    events = EventAccumulator(
        logger.log_dir, size_guidance={"images": 0, "histograms": 0, "tensors": 0, "scalars": 0}
    )
    events.Reload()
    tags = events.Tags()
    for tag in ("representer/stationarity", "representer/decomposition_residual", "representer/agreement",
                "representer/dump_seconds"):  # fmt: skip
        assert tag in tags["scalars"], tags["scalars"]
    assert "representer/alpha" in tags["histograms"]
    assert "representer/examples" in tags["images"]
    text_tags = tags["tensors"]
    assert {"representer/suspects/text_summary", "representer/sparse/text_summary"} <= set(text_tags), (
        text_tags
    )
    agreement = [e.value for e in events.Scalars("representer/agreement")]
    assert len(agreement) == 2 and all(a >= 0.9 for a in agreement)


class _Tabular(ClassifierModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc1=nn.Linear(64, 16), act=nn.ReLU(),
                                             head=nn.Linear(16, 10)))  # fmt: skip
        from torchmetrics.classification import MulticlassAccuracy

        self.val_accuracy = MulticlassAccuracy(10, average="micro")


class _FlatDigits(DigitsDataModule):
    def setup(self, stage=None):
        super().setup(stage)
        for name in ("train_dataset", "val_dataset"):
            ds = getattr(self, name)
            ds.tensors = (ds.tensors[0].reshape(len(ds), 64), ds.tensors[1])


def test_tabular_inputs_give_text_table(tmp_path):
    monitor = _monitor(layer="net.head")
    logger = TensorBoardLogger(str(tmp_path), name="run")
    fit([monitor], model_fn=_Tabular, datamodule=_FlatDigits(), max_epochs=1, limit_train_batches=3,
        limit_val_batches=1, logger=logger)  # fmt: skip
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    assert "representer/examples/text_summary" in events.Tags()["tensors"]
    assert "representer/examples" not in events.Tags()["images"]
    assert not monitor.problems.counts.get("dump_failed")


def test_end_of_fit_dump_when_epochs_do_not_divide(tmp_path):
    monitor = _monitor(every_n_epochs=5)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    fit([monitor], max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=logger)
    files = sorted(
        os.path.basename(p) for p in glob.glob(os.path.join(logger.log_dir, "representer_epoch*.pt"))
    )
    assert files == ["representer_epoch1.pt"] and monitor.dumps == 1


def test_state_dict_round_trip_and_repr():
    monitor = _monitor()
    fit([monitor], max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    state = monitor.state_dict()
    fresh = _monitor()
    assert fresh.state_key == monitor.state_key
    fresh.load_state_dict(state)
    assert fresh.dumps == monitor.dumps == 1
    assert "every_n_epochs=1" in repr(fresh) and "max_train_examples=300" in repr(fresh)


class _HeadTwice(DigitsCNN):
    def forward(self, x):
        features = self.net[:-1](x)
        return self.net.fc2(features) + 0 * self.net.fc2(features)


def test_head_run_twice_warns_once_names_layer_and_goes_idle():
    monitor = _monitor()
    with pytest.warns(UserWarning, match="ran 2 times.*`layer=`"):
        model, trainer = fit(
            [monitor], model_fn=_HeadTwice, max_epochs=3, limit_train_batches=2, limit_val_batches=1
        )
    # found at the first dump (NaN logged there, every rank alike), then idle: no further attempt, hooks gone
    assert trainer.current_epoch == 3 and monitor.problems.counts["head_input"] == 1 and monitor.dumps == 0
    assert not monitor.problems.counts.get("dump_failed") and monitor.idle and len(monitor.hooks) == 0
    assert torch.isnan(trainer.callback_metrics["representer/stationarity"])


class _RaisingInDumps(DigitsCNN):
    """Its forward raises in eval mode (the monitor's passes) only: a failing dump, not a property of the head."""

    def forward(self, x):
        if not self.training:
            raise RuntimeError("eval forward failed")
        return super().forward(x)


def test_failing_dumps_are_counted_each_time_and_training_continues():
    monitor = _monitor()
    with pytest.warns(UserWarning, match="representer dump failed"):
        _, trainer = fit([monitor], model_fn=_RaisingInDumps, max_epochs=2, limit_train_batches=2,
                         limit_val_batches=0)  # fmt: skip
    assert trainer.current_epoch == 2 and monitor.problems.counts["dump_failed"] == 2 and monitor.dumps == 0
    assert monitor.idle is None
    assert torch.isnan(trainer.callback_metrics["representer/stationarity"])
