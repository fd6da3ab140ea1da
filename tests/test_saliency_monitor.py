"""SaliencyMonitor in a real CPU Trainer: zero interference, what lands in the event file, bad input, hooks."""

from __future__ import annotations

import io
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from lightning import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import assert_same_weights, count_hooks, fit, weights_of
from lightning_interp.callbacks import SaliencyMonitor
from lightning_interp.data import DigitsDataModule
from lightning_interp.errors import LightningInterpError
from torchmetrics.classification import MulticlassAccuracy

from lightning_interp.models import ClassifierModule, DigitsCNN

FAST = dict(limit_train_batches=3, limit_val_batches=1)
SMALL = dict(num_examples=3, smoothgrad_samples=2, ig_steps=3)
ALL_METHODS = ("saliency", "input_x_gradient", "smoothgrad", "integrated_gradients", "guided_backprop")


def _events(path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def _logger(tmp_path) -> TensorBoardLogger:
    return TensorBoardLogger(str(tmp_path), name="", version="run")


def _saliency_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "SaliencyMonitor" in str(w.message)]


def test_zero_interference_two_epochs_bitwise(tmp_path):
    plain, _ = fit([], max_epochs=2, **FAST)
    rng_plain = torch.get_rng_state()
    monitor = SaliencyMonitor(methods=ALL_METHODS, randomization_check=True, **SMALL)
    watched, _ = fit([monitor], max_epochs=2, logger=_logger(tmp_path), **FAST)
    assert monitor.dumps == 2 and set(monitor.last_maps) == set(ALL_METHODS)
    assert_same_weights(weights_of(plain), weights_of(watched))  # BatchNorm buffers included
    assert torch.equal(torch.get_rng_state(), rng_plain)
    assert all(p.grad is None or torch.equal(p.grad, q.grad) for p, q in zip(watched.parameters(), plain.parameters()))


class Snapshot(Callback):
    """Placed before the monitor: records the model's state and plants traps (mixed modes, .grad, flags)."""

    def on_train_epoch_end(self, trainer, pl_module):
        pl_module.net.norm2.eval()  # a module whose mode differs from its parent's must keep it
        pl_module.net.fc2.bias.requires_grad_(False)
        for p in pl_module.parameters():
            p.grad = torch.full_like(p, 0.5)
        self.modes = {n: m.training for n, m in pl_module.named_modules()}
        self.flags = [p.requires_grad for p in pl_module.parameters()]
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.rng = torch.get_rng_state()


class Check(Callback):
    """Placed after the monitor: nothing may have changed."""

    def __init__(self, before: Snapshot) -> None:
        self.before = before
        self.checked = 0

    def on_train_epoch_end(self, trainer, pl_module):
        before = self.before
        assert {n: m.training for n, m in pl_module.named_modules()} == before.modes
        assert [p.requires_grad for p in pl_module.parameters()] == before.flags
        assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in pl_module.parameters())
        assert all(torch.equal(v, before.state[k]) for k, v in pl_module.state_dict().items())
        assert torch.equal(torch.get_rng_state(), before.rng)
        pl_module.net.norm2.train()
        pl_module.net.fc2.bias.requires_grad_(True)
        for p in pl_module.parameters():
            p.grad = None
        self.checked += 1


def test_modes_stats_grads_flags_and_rng_unchanged_around_a_dump(tmp_path):
    before = Snapshot()
    check = Check(before)
    monitor = SaliencyMonitor(methods=ALL_METHODS, randomization_check=True, **SMALL)
    fit([before, monitor, check], max_epochs=1, logger=_logger(tmp_path), **FAST)
    assert check.checked == 1 and monitor.dumps == 1


def test_images_in_event_file(tmp_path):
    k = 4
    monitor = SaliencyMonitor(num_examples=k, every_n_epochs=2, smoothgrad_samples=2, ig_steps=3)
    model, trainer = fit([monitor], max_epochs=3, logger=_logger(tmp_path), **FAST)
    acc = _events(tmp_path / "run")
    tags = acc.Tags()["images"]
    assert sorted(tags) == sorted(f"saliency/{m}/examples" for m in ("saliency", "smoothgrad", "integrated_gradients"))
    for tag in tags:
        events = acc.Images(tag)
        # epoch 2 (index 1) and the end of fit (after epoch 3): one image per method per dump
        assert [e.step for e in events] == [2 * FAST["limit_train_batches"], 3 * FAST["limit_train_batches"]]
        picture = np.asarray(Image.open(io.BytesIO(events[-1].encoded_image_string)).convert("RGB"))
        assert picture.shape[0] == events[-1].height and picture.shape[1] == events[-1].width
        # k rows of 64-pixel cells (8x8 digits upscaled 8x) below a title row; 3 picture columns beside captions
        assert k * 64 < picture.shape[0] < k * 64 + 40 and picture.shape[1] > 3 * 64
        # the heatmap column of row 0 is the colour map of the final maps: not blank
        assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 20
    text_tags = acc.Tags()["tensors"]
    assert "saliency/predictions/text_summary" in text_tags


def test_examples_spread_over_classes_and_stable():
    monitor = SaliencyMonitor(num_examples=10)
    dm = DigitsDataModule(batch_size=64)
    fit([monitor], max_epochs=1, datamodule=dm, limit_train_batches=1, limit_val_batches=1)
    inputs, targets = monitor._examples
    assert sorted(targets.tolist()) == list(range(10))
    # the same images as the validation set holds for those classes, in the data's order
    val_x, val_y = dm.val_dataset.tensors
    for x, y in zip(inputs, targets):
        assert any(torch.equal(x, v) for v in val_x[val_y == y])


class TabularModel(ClassifierModule):
    def __init__(self, features: int = 6) -> None:
        super().__init__(lr=1e-2)
        self.net = nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, 3))
        self.val_accuracy = MulticlassAccuracy(3)


class SequenceModel(ClassifierModule):
    def __init__(self) -> None:
        super().__init__(lr=1e-2)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Flatten(), nn.Linear(5 * 8, 3))
        self.val_accuracy = MulticlassAccuracy(3)


def _loaders(shape: tuple[int, ...], classes: int = 3, n: int = 48):
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn((n, *shape), generator=gen), torch.randint(classes, (n,), generator=gen))
    return DataLoader(data, batch_size=16), DataLoader(data, batch_size=16)


def _fit_with(model, loaders, callbacks, tmp_path=None, **kwargs):
    L.seed_everything(0, verbose=False)
    options = dict(accelerator="cpu", max_epochs=1, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, logger=_logger(tmp_path) if tmp_path else False)  # fmt: skip
    options.update(kwargs)
    trainer = L.Trainer(callbacks=callbacks, **options)
    trainer.fit(model, *loaders)
    return trainer


@pytest.mark.parametrize("kind", ["tabular", "sequence"])
def test_tabular_and_sequence_pictures(tmp_path, kind):
    shape = (6,) if kind == "tabular" else (5, 4)
    model = TabularModel() if kind == "tabular" else SequenceModel()
    names = [f"f{i}" for i in range(6)] if kind == "tabular" else None
    monitor = SaliencyMonitor(methods=("saliency", "integrated_gradients"), feature_names=names, **SMALL)
    _fit_with(model, _loaders(shape), [monitor], tmp_path)
    acc = _events(tmp_path / "run")
    assert sorted(acc.Tags()["images"]) == ["saliency/integrated_gradients/examples", "saliency/saliency/examples"]
    for tag in acc.Tags()["images"]:
        (event,) = acc.Images(tag)
        assert event.width >= (6 if kind == "tabular" else 5) * 12 and event.height > 3 * 14


def test_unknown_method_lists_valid_ones():
    with pytest.raises(LightningInterpError) as info:
        SaliencyMonitor(methods=("saliency", "gradcam"))
    assert "gradcam" in str(info.value) and "integrated_gradients" in str(info.value)
    with pytest.raises(LightningInterpError, match="every_n_epochs"):
        SaliencyMonitor(every_n_epochs=0)
    with pytest.raises(LightningInterpError, match="inputs"):
        SaliencyMonitor(inputs=torch.zeros(2, 5, 4, 4))  # 5 channels: cannot be drawn


def _fit_warns(callbacks, tmp_path, model=None, loaders=None, **kwargs):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if loaders is not None:
            _fit_with(model, loaders, callbacks, tmp_path, **kwargs)
        else:
            fit(callbacks, model_fn=model or (lambda: DigitsCNN()), max_epochs=2, logger=_logger(tmp_path), **FAST)
    return _saliency_warnings(record)


def test_target_out_of_range_warns_once_and_training_continues(tmp_path):
    x = DigitsDataModule.input_shape
    monitor = SaliencyMonitor(inputs=torch.rand(3, *x), targets=torch.tensor([1, 2, 42]), **{k: v for k, v in SMALL.items() if k != "num_examples"})
    messages = _fit_warns([monitor], tmp_path)
    assert len([m for m in messages if "dump failed" in m]) == 1 and "42" in messages[0]
    assert monitor.problems.counts["dump_failed"] == 2 and monitor.dumps == 0


def test_undrawable_inputs_warn_once(tmp_path):
    class FlatModel(ClassifierModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3 * 2, 3))
            self.val_accuracy = MulticlassAccuracy(3)

    monitor = SaliencyMonitor(**SMALL)
    messages = _fit_warns([monitor], tmp_path, FlatModel(), _loaders((2, 3, 3, 2)))
    assert len(messages) == 1 and "cannot be drawn" in messages[0]
    assert monitor.dumps == 0


class RaisesOnSmallBatches(DigitsCNN):
    """Raises on the monitor's batch of 3 examples only: training and validation batches are larger."""

    def forward(self, x):
        if x.shape[0] == SMALL["num_examples"]:
            raise RuntimeError("no forward on 3 examples")
        return super().forward(x)


def test_forward_raising_during_dump_warns_once_and_training_continues(tmp_path):
    monitor = SaliencyMonitor(methods=ALL_METHODS, **SMALL)
    model = RaisesOnSmallBatches()
    hooks = count_hooks(model)
    messages = _fit_warns([monitor], tmp_path, lambda: model)
    assert len([m for m in messages if "dump failed" in m]) == 1 and "no forward on 3 examples" in messages[0]
    assert monitor.problems.counts["dump_failed"] == 2
    assert model.trainer.current_epoch == 2  # both epochs ran
    assert model.training and all(m.training for m in model.modules())
    assert count_hooks(model) == hooks and all(p.requires_grad for p in model.parameters())


def test_hook_hygiene_after_fit_and_after_a_failing_fit(tmp_path):
    model = DigitsCNN()
    before = count_hooks(model)
    monitor = SaliencyMonitor(methods=("guided_backprop",), **SMALL)
    trainer = L.Trainer(max_epochs=1, callbacks=[monitor], logger=_logger(tmp_path), enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, **FAST)  # fmt: skip
    trainer.fit(model, DigitsDataModule())
    trainer = L.Trainer(max_epochs=1, callbacks=[monitor], logger=_logger(tmp_path), enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, **FAST)  # fmt: skip
    trainer.fit(model, DigitsDataModule())  # fitting twice doubles nothing
    assert count_hooks(model) == before

    for error in (RuntimeError, KeyboardInterrupt):

        class Boom(Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                raise error("stop")

        trainer = L.Trainer(max_epochs=1, callbacks=[monitor, Boom()], logger=_logger(tmp_path),
                            enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                            **FAST)  # fmt: skip
        # Lightning 2.6 turns KeyboardInterrupt into a graceful shutdown and SystemExit(1)
        with pytest.raises((RuntimeError, SystemExit)):
            trainer.fit(model, DigitsDataModule())
        assert count_hooks(model) == before


def test_without_tensorboard_nothing_is_computed_and_one_warning(tmp_path):
    monitor = SaliencyMonitor(**SMALL)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit([monitor], max_epochs=1, **FAST)
    messages = _saliency_warnings(record)
    assert len(messages) == 1 and "TensorBoardLogger" in messages[0]
    assert monitor.last_maps == {} and monitor.dumps == 0


def test_state_dict_round_trip(tmp_path):
    monitor = SaliencyMonitor(**SMALL)
    fit([monitor], max_epochs=1, logger=_logger(tmp_path), **FAST)
    other = SaliencyMonitor(**SMALL)
    other.load_state_dict(monitor.state_dict())
    assert other.dumps == monitor.dumps == 1 and other.state_key == monitor.state_key
    assert "SaliencyMonitor(methods=" in repr(other)


def test_randomization_check_is_logged_through_lightning(tmp_path):
    monitor = SaliencyMonitor(methods=("saliency",), randomization_check=True, **SMALL)
    _, trainer = fit([monitor], max_epochs=1, logger=_logger(tmp_path), **FAST)
    value = trainer.callback_metrics["saliency/saliency/randomization_rank_corr"]
    assert -1.0 <= float(value) <= 1.0


def test_maps_equal_the_captum_checked_functions(tmp_path):
    """The monitor evaluates all gradient methods in one fused pass; its maps must equal the public functions'."""
    from lightning_interp.attribution import input_x_gradient, integrated_gradients, saliency, smoothgrad

    monitor = SaliencyMonitor(methods=ALL_METHODS, num_examples=4, smoothgrad_samples=3, ig_steps=5)
    model, _ = fit([monitor], max_epochs=1, logger=_logger(tmp_path), **FAST)
    model.eval()
    x, y = monitor._examples
    noise = monitor.smoothgrad_noise(x)
    stdev = 0.15 * float(x.max() - x.min())
    expected = {
        "saliency": saliency(model, x, y),
        "input_x_gradient": input_x_gradient(model, x, y),
        "smoothgrad": smoothgrad(model, x, y, stdev, n_samples=3, noise=noise),
        "integrated_gradients": integrated_gradients(model, x, y, n_steps=5),
    }
    for method, want in expected.items():
        got = monitor.last_maps[method]
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-5, method
    assert float(noise.std()) == pytest.approx(stdev, rel=0.2)
