"""The fault matrix: one row per situation users run into, every callback attached at its most frequent setting.

Each row states its documented outcome (the README's fault table is checked against ``ROWS`` below) and the test
checks it: the fit ends (or raises the user's own exception, unchanged), the model keeps no hook of ours, the
problems we promise to count are counted, and where the row says so, the model's weights are bitwise identical to a
run without our callbacks.
"""

from __future__ import annotations

import csv
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Subset

from lightning_interp.data import DigitsDataModule
from lightning_interp.hooks import count_hooks
from lightning_interp.models import DigitsCNN
from tests.helpers import TAG_FAMILIES, assert_same_weights, every_callback, quiet_trainer, weights_of

README = Path(__file__).resolve().parents[1] / "README.md"


# ---- the odd models and data of the matrix ---------------------------------------------------------------------
class RaisingCNN(DigitsCNN):
    """Raises ``error`` from its forward at the second training batch."""

    error: BaseException = RuntimeError("the user's forward failed")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 1:
            raise self.error
        return super().training_step(batch, batch_idx)


class InterruptedCNN(RaisingCNN):
    error = KeyboardInterrupt()


class DictCNN(DigitsCNN):
    """Returns ``{"logits": ...}`` from its forward."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"logits": self.net(x)}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x)["logits"], y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_accuracy.update(self(x)["logits"], y)
        self.log("val_acc", self.val_accuracy)


class TwoOptimizerCNN(DigitsCNN):
    """Manual optimization: the convolutions and the dense head each have their own optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        head = [p for n, p in self.named_parameters() if n.startswith(("net.fc", "net.norm4"))]
        body = [p for n, p in self.named_parameters() if not n.startswith(("net.fc", "net.norm4"))]
        return [torch.optim.Adam(body, lr=self.lr), torch.optim.SGD(head, lr=0.1)]

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        body, head = self.optimizers()
        loss = F.cross_entropy(self(x), y)
        body.zero_grad()
        head.zero_grad()
        self.manual_backward(loss)
        body.step()
        head.step()
        self.log("train_loss", loss)


class NaNLossCNN(DigitsCNN):
    """Its loss is NaN at the second step (and its weights NaN from then on)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx == 1 else loss


class NoDenseNormCNN(DigitsCNN):
    """BatchNorm2d only (the dense BatchNorm1d would refuse a batch of one in training, before any callback)."""

    def __init__(self) -> None:
        super().__init__(norm="batch")
        self.net.norm4 = nn.Identity()


def compiled_cnn() -> DigitsCNN:
    """The network compiled, as Lightning's docs advise (compiling the LightningModule itself fails in torch 2.13 +
    Lightning 2.6 at the module's own ``self.log``, with or without our callbacks). ``aot_eager``: Dynamo and
    AOTAutograd as in any compiled run, without a C++ toolchain or minutes of compiling."""
    model = DigitsCNN()
    model.net = torch.compile(model.net, backend="aot_eager")  # type: ignore[assignment]
    return model


class BatchOf(DigitsDataModule):
    """Training batches of ``size`` examples (the last one of ``last`` when given), validation as usual."""

    def __init__(self, size: int, last: int | None = None) -> None:
        super().__init__(batch_size=size)
        self.last = last

    def train_dataloader(self) -> DataLoader:
        data = self.train_dataset
        if self.last is not None:  # 2 full batches, then one of `last`
            data = Subset(data, range(2 * self.batch_size + self.last))
        return DataLoader(data, batch_size=self.batch_size, shuffle=False)


class EmptyValidation(DigitsDataModule):
    def val_dataloader(self) -> DataLoader:
        return DataLoader(Subset(self.val_dataset, []), batch_size=32)


def ema() -> list[Any]:
    return [WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(0.9))]


ALL = ("LinearProbeMonitor", "NormStatsMonitor", "GradFlowMonitor", "SaliencyMonitor", "RepresenterMonitor")


# ---- the matrix --------------------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    outcome: str  # as documented in the README
    trainer: dict[str, Any] = field(default_factory=dict)
    model: Callable[[], Any] = DigitsCNN
    data: Callable[[], Any] = lambda: DigitsDataModule(batch_size=32)
    extra: Callable[[], list[Any]] = list
    stage: str = "fit"
    raises: type[BaseException] | None = None
    counted: dict[str, set[str]] = field(
        default_factory=dict
    )  # callback -> problem kinds that must be counted
    same_weights: bool = False  # bitwise identical to a run without our callbacks
    logger: str = "tensorboard"


ROWS = [
    Row("logger=False", "trains; scalars still reach `callback_metrics`; one warning per callback that TensorBoard-only "
        "output is skipped", logger="none", counted={name: {"no_tensorboard"} for name in ALL}),
    Row("CSVLogger only", "trains; every scalar family lands in `metrics.csv`; images, histograms and texts are skipped "
        "with one warning", logger="csv", counted={name: {"no_tensorboard"} for name in ALL}),
    Row("fast_dev_run", "runs its single batch with every callback (Lightning turns loggers off)",
        trainer={"fast_dev_run": True}),
    Row("limit_val_batches=0", "trains; probe training accuracy only; saliency and representer examples still come "
        "from the validation set", trainer={"limit_val_batches": 0}),
    Row("gradient accumulation", "works; weights bitwise identical to a run without callbacks",
        trainer={"accumulate_grad_batches": 2}, same_weights=True),
    Row('precision="bf16-mixed" (CPU)', "works; weights bitwise identical to a run without callbacks",
        trainer={"precision": "bf16-mixed"}, same_weights=True),
    Row("torch.compile'd network", "works; layers keep their uncompiled names (`net.relu1`, not `net._orig_mod.relu1`)",
        model=compiled_cnn),
    Row("manual optimization, two optimizers", "works; weights bitwise identical to a run without callbacks",
        model=TwoOptimizerCNN, same_weights=True),
    Row("model returning a dict", "every callback works; saliency maps explain the dict's `logits`", model=DictCNN),
    Row("forward raising mid-epoch", "the user's exception propagates unchanged; every hook is removed",
        model=RaisingCNN, raises=RuntimeError),
    Row("KeyboardInterrupt", "Lightning's graceful stop (SystemExit in Lightning 2.6); every hook is removed",
        model=InterruptedCNN, raises=SystemExit),
    Row("EMA weight averaging (WeightAveraging)", "works; the deep-copied average carries no hook; weights bitwise "
        "identical to a run without callbacks", extra=ema, same_weights=True),
    Row("trainer.validate() alone", "runs in inference mode; nothing to probe yet, no hook left", stage="validate"),
    Row("trainer.test() alone", "runs in inference mode; no hook left", stage="test"),
    Row("empty validation set", "trains; saliency examples come from the training data, representer points explain "
        "no validation example (one warning each)", data=EmptyValidation,
        counted={"SaliencyMonitor": {"train_examples"}, "RepresenterMonitor": {"no_val_data"}}),
    Row("batch of 1 (BatchNorm2d)", "works; a 1-example batch's statistics are computed over its positions",
        model=NoDenseNormCNN, data=lambda: BatchOf(1)),
    Row("last batch of 1 (BatchNorm1d)", "the model's own BatchNorm error propagates unchanged; hooks removed",
        data=lambda: BatchOf(8, last=1), raises=ValueError),
    Row("NaN loss", "training goes on (Lightning does not stop it); NaN activations and gradients are counted and "
        "warned about once per callback", model=NaNLossCNN,
        counted={"LinearProbeMonitor": {"nan_activations"}, "GradFlowMonitor": {"nonfinite_gradients"}}),
]  # fmt: skip


def _logger(row: Row, tmp_path: Path) -> Any:
    if row.logger == "none":
        return False
    if row.logger == "csv":
        return CSVLogger(str(tmp_path), name="csv", version="")
    return TensorBoardLogger(str(tmp_path), name="tb", version="", default_hp_metric=False)


def _prepare(row: Row, tmp_path: Path, with_ours: bool) -> tuple[Any, list[Any], L.Trainer]:
    """The row's model, our callbacks (or none) and its Trainer, seeded."""
    L.seed_everything(0, verbose=False)
    model, ours = row.model(), every_callback(representer_examples=64) if with_ours else []
    options: dict[str, Any] = dict(
        max_epochs=1, limit_train_batches=3, limit_val_batches=2, log_every_n_steps=1
    )
    options.update(row.trainer)
    trainer = quiet_trainer(
        [*row.extra(), *ours], logger=_logger(row, tmp_path) if with_ours else False, **options
    )
    return model, ours, trainer


def _run(row: Row, tmp_path: Path, with_ours: bool) -> tuple[Any, list[Any], L.Trainer]:
    model, ours, trainer = _prepare(row, tmp_path, with_ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(trainer, row.stage)(model, datamodule=row.data())
    return model, ours, trainer


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_fault_matrix(row: Row, tmp_path: Path) -> None:
    if row.raises is not None:
        model, ours, trainer = _prepare(row, tmp_path, with_ours=True)
        with warnings.catch_warnings(), pytest.raises(row.raises) as raised:
            warnings.simplefilter("ignore")
            trainer.fit(model, datamodule=row.data())
        if isinstance(model, RaisingCNN) and row.raises is RuntimeError:
            assert raised.value is RaisingCNN.error, "the user's exception was replaced"
        assert count_hooks(model) == 0 and all(len(c.hooks) == 0 for c in ours)
        return

    model, ours, trainer = _run(row, tmp_path, with_ours=True)
    assert count_hooks(model) == 0 and all(len(c.hooks) == 0 for c in ours), "hooks left behind"
    by_name = {type(c).__name__: c for c in ours}
    for name, kinds in row.counted.items():
        missing = kinds - set(by_name[name].problems.counts)
        assert not missing, f"{name} did not count {missing}: {dict(by_name[name].problems.counts)}"
    for extra in trainer.callbacks:
        if isinstance(extra, WeightAveraging):
            assert count_hooks(extra._average_model) == 0, "the averaged copy carries hooks"
    if row.stage == "fit" and "fast_dev_run" not in row.trainer:
        assert any(k.startswith("norm/") for k in trainer.callback_metrics), "no statistics logged"
        assert any(k.startswith("probe/") for k in trainer.callback_metrics), "no probe accuracy logged"
        assert "norm/net.relu1/act_mean" in trainer.callback_metrics, sorted(trainer.callback_metrics)
    if row.trainer.get("limit_val_batches") == 0:
        assert not any(k.startswith("probe/val_acc") for k in trainer.callback_metrics)
    if row.logger == "csv":
        with open(tmp_path / "csv" / "metrics.csv") as f:
            columns = set(next(csv.reader(f)))
        for family in TAG_FAMILIES:
            assert any(c.startswith(family) for c in columns), f"{family} missing from metrics.csv"
    if row.same_weights:
        plain, _, _ = _run(row, tmp_path, with_ours=False)
        assert_same_weights(weights_of(plain), weights_of(model))


def test_readme_lists_the_matrix() -> None:
    text = README.read_text()
    for row in ROWS:
        line = next((ln for ln in text.splitlines() if ln.startswith(f"| {row.name} |")), None)
        assert line is not None, f"README's fault table lacks the row {row.name!r}"
        assert re.sub(r"\s+", " ", row.outcome) in line, (
            f"README's outcome for {row.name!r} differs from the test's"
        )


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"])
def test_sharded_strategies_refused_at_setup_by_the_weight_readers(strategy: str) -> None:
    # FSDP needs a GPU in Lightning 2.6, so the refusal is checked on a stand-in whose class has the strategy's name
    from types import SimpleNamespace

    from lightning_interp.callbacks import (
        GradFlowMonitor,
        LinearProbeMonitor,
        NormStatsMonitor,
        RepresenterMonitor,
        SaliencyMonitor,
    )
    from lightning_interp.errors import LightningInterpError

    trainer = SimpleNamespace(strategy=type(strategy, (), {})())
    for callback in (SaliencyMonitor(), RepresenterMonitor(), GradFlowMonitor()):
        with pytest.raises(
            LightningInterpError, match=f"{type(callback).__name__} does not support {strategy}"
        ):
            callback.setup(trainer, DigitsCNN(), "fit")
    for callback in (LinearProbeMonitor(), NormStatsMonitor()):
        callback.setup(trainer, DigitsCNN(), "fit")  # they only read activations: allowed
