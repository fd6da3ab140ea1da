"""Every callback configurable from YAML through LightningCLI; invalid values rejected at parse time."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_interp.callbacks import (
    GradFlowMonitor,
    LinearProbeMonitor,
    NormStatsMonitor,
    RepresenterMonitor,
    SaliencyMonitor,
)
from lightning_interp.data import DigitsDataModule
from lightning_interp.models import DigitsCNN

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "config.yaml"


def short_config(tmp_path: Path, **callback_overrides) -> Path:
    config = yaml.safe_load(CONFIG.read_text())
    config["trainer"].update(
        max_epochs=1, limit_train_batches=3, limit_val_batches=1, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    for callback in config["trainer"]["callbacks"]:
        name = callback["class_path"].rsplit(".", 1)[1]
        callback["init_args"].update(callback_overrides.get(name, {}))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_through_lightning_cli_with_the_example_config(tmp_path):
    path = short_config(tmp_path)
    cli = LightningCLI(DigitsCNN, DigitsDataModule, args=["fit", "--config", str(path)],
                       save_config_kwargs={"overwrite": True})  # fmt: skip
    kinds = {type(cb) for cb in cli.trainer.callbacks}
    assert {LinearProbeMonitor, NormStatsMonitor, GradFlowMonitor, SaliencyMonitor, RepresenterMonitor} <= kinds
    probe = next(cb for cb in cli.trainer.callbacks if isinstance(cb, LinearProbeMonitor))
    assert probe.layers == ["input", "net.relu*"] and probe.history["val"]
    assert cli.trainer.current_epoch == 1


@pytest.mark.parametrize(
    "callback, value",
    [("LinearProbeMonitor", {"fit": "sgd"}), ("SaliencyMonitor", {"target": "random"})],
)
def test_invalid_literal_rejected_at_parse_time(tmp_path, capsys, callback, value):
    path = short_config(tmp_path, **{callback: value})
    with pytest.raises(SystemExit):
        LightningCLI(DigitsCNN, DigitsDataModule, args=["fit", "--config", str(path)], run=False)
    err = capsys.readouterr().err
    key, bad = next(iter(value.items()))
    assert callback in err and bad in err
