"""lightning_interp.compare: reading runs written with known values, the table, the files, and a real run."""

from __future__ import annotations

import statistics

import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter

from lightning_interp.callbacks import GradFlowMonitor, LinearProbeMonitor, NormStatsMonitor
from lightning_interp.compare import compare_command, compare_runs, find_runs
from lightning_interp.errors import LightningInterpError
from lightning_interp.models import DigitsCNN
from tests.helpers import fit


def write_run(folder, val_acc, products, gains=(), dead=(), probes=None):
    writer = SummaryWriter(str(folder))
    for epoch, value in enumerate(val_acc):
        step = 10 * (epoch + 1) - 1
        writer.add_scalar("val_acc", value, step)
        writer.add_scalar("epoch", epoch, step)
    for step, value in enumerate(products):
        writer.add_scalar("gradflow/total/cum_product", value, step)
    for step, value in enumerate(gains):
        writer.add_scalar("norm/total/effective_gain", value, step)
    for step, value in enumerate(dead):
        writer.add_scalar("norm/total/dead_frac", value, step)
    for layer, value in (probes or {}).items():
        writer.add_scalar(f"probe/val_acc/{layer}", 0.1, 0)
        writer.add_scalar(f"probe/val_acc/{layer}", value, 5)
    writer.close()


@pytest.fixture
def runs(tmp_path):
    write_run(
        tmp_path / "bn" / "version_0",
        [0.5, 0.85, 0.91, 0.95],
        [1.0, 2.0, 4.0],
        gains=[2.0, 3.0, 7.0],
        dead=[0.5, 0.25],
        probes={"net.act10": 0.9, "input": 0.8, "net.act2": 0.85},
    )
    write_run(tmp_path / "plain" / "lightning_logs" / "version_3", [0.2, 0.3], [1e-5, 3e-5, 2e-5, 1e-6])
    (tmp_path / "notes").mkdir()
    return tmp_path


def test_reads_known_values(runs):
    assert list(find_runs(runs)) == ["bn", "plain"]
    bn, plain = compare_runs(runs)
    assert bn.final_val_acc == pytest.approx(0.95)
    assert bn.epochs_to_target == 3  # 0.91 at epoch index 2 = after 3 epochs
    assert list(bn.probe_acc) == ["input", "net.act2", "net.act10"]
    assert bn.probe_acc["net.act10"] == pytest.approx(0.9)
    assert bn.median_cum_product == pytest.approx(2.0)
    assert bn.mean_effective_gain == pytest.approx(4.0)
    assert bn.dead_frac == pytest.approx(0.25)
    assert plain.epochs_to_target is None and plain.final_val_acc == pytest.approx(0.3)
    assert plain.median_cum_product == pytest.approx(statistics.median([1e-5, 3e-5, 2e-5, 1e-6]), rel=1e-6)


def test_command_writes_markdown_and_figure(runs):
    text = compare_command(runs)
    assert "| bn | 0.950 | 3 | 0.80 / 0.85 / 0.90 | 2 | 4 | 0.250 | — |" in text
    assert "| plain | 0.300 | never | — | 1.5e-05 | — | — | — |" in text
    assert (runs / "compare.md").read_text().count("| bn |") == 1
    png = (runs / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_bad_runs_dir(tmp_path):
    with pytest.raises(LightningInterpError, match="`runs_dir`.*not a folder"):
        compare_runs(tmp_path / "missing")
    with pytest.raises(LightningInterpError, match="has none"):
        compare_runs(tmp_path)


def test_reads_what_the_callbacks_write(tmp_path):
    for norm in ("batch", "none"):
        logger = TensorBoardLogger(str(tmp_path), name=f"cnn-{norm}", version=0)
        callbacks = [NormStatsMonitor(), GradFlowMonitor(), LinearProbeMonitor()]
        fit(
            callbacks,
            lambda: DigitsCNN(norm=norm),
            max_epochs=2,
            limit_train_batches=4,
            limit_val_batches=1,
            log_every_n_steps=2,
            logger=logger,
        )
    batch, none = compare_runs(tmp_path)
    assert batch.name == "cnn-batch" and none.name == "cnn-none"
    for run in (batch, none):
        assert 0.0 <= run.final_val_acc <= 1.0 and len(run.val_acc_curve) == 2
        assert list(run.probe_acc) == ["input", "net.relu1", "net.relu2", "net.relu3", "net.relu4"]
        assert run.median_cum_product > 0 and 0.0 <= run.dead_frac <= 1.0
    assert (
        batch.mean_effective_gain > 0 and none.mean_effective_gain != none.mean_effective_gain
    )  # nan: no norm


def test_probe_layers_in_the_logged_model_order_and_exclude(tmp_path):
    # names whose natural order is not the model's: the stem `net.embed` sorts after `net.blocks.*` by name
    order = ["input", "net.embed", "net.blocks.0", "net.blocks.1", "net.blocks.10", "net.blocks.2",
             "net.head@1"]
    folder = tmp_path / "transformer" / "preln"
    write_run(folder, [0.5], [1.0], probes={name: 0.5 for name in order})
    with SummaryWriter(str(folder)) as writer:
        rows = [f"| {i} | `{name}` | Block |" for i, name in enumerate(order[:-1] + ["net.head"])]
        writer.add_text("probe/layers", "| # | layer | module |\n|---|---|---|\n" + "\n".join(rows), 0)
    # the same layers without the text: natural order of the names
    write_run(tmp_path / "transformer" / "none", [0.5], [1.0], probes={name: 0.5 for name in order})
    write_run(tmp_path / "none", [0.4], [1.0])
    runs = {run.name: run for run in compare_runs(tmp_path)}
    assert list(runs["transformer/preln"].probe_acc) == order
    assert list(runs["transformer/none"].probe_acc) == [
        "input", "net.blocks.0", "net.blocks.1", "net.blocks.2", "net.blocks.10", "net.embed", "net.head@1"
    ]  # fmt: skip
    assert [run.name for run in compare_runs(tmp_path, exclude=("transformer",))] == ["none"]
    kept = compare_runs(tmp_path, exclude=("transformer/none", "none"))
    assert [run.name for run in kept] == ["transformer/preln"]
