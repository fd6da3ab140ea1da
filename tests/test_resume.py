"""Checkpoint resume of the whole suite: 4 epochs in one go against 2 epochs + resume for 2 more.

Every callback is attached at its most frequent setting. The two runs must end with bitwise-identical probe weights,
probe optimizer state and power-iteration vectors, the same histories and counters, and TensorBoard curves, images,
histograms and texts at the same steps without gaps or duplicates (the scalar values equal too, timings excepted).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_interp.callbacks import (
    GradFlowMonitor,
    LinearProbeMonitor,
    NormStatsMonitor,
    RepresenterMonitor,
    SaliencyMonitor,
)
from lightning_interp.models import DigitsCNN
from tests.helpers import (
    TAG_FAMILIES,
    OrderedDigits,
    assert_same_weights,
    every_callback,
    quiet_trainer,
    weights_of,
)

#: written again by every fit start, at the step the fit starts from
RESTATED = ("summary/run/text_summary", "probe/layers/text_summary", "custom_scalars__config__")


def _run(root: Path, version: str, max_epochs: int, ckpt_path: str | None = None) -> tuple[Any, list[Any]]:
    L.seed_everything(0, verbose=False)
    model = DigitsCNN(norm="batch", dropout=0.0)
    callbacks = every_callback()
    trainer = quiet_trainer(
        [*callbacks, ModelCheckpoint(dirpath=root / f"checkpoints_{version}", save_top_k=-1)],
        logger=TensorBoardLogger(str(root), name="runs", version=version, default_hp_metric=False),
        enable_checkpointing=True,
        max_epochs=max_epochs,
        limit_train_batches=4,
        limit_val_batches=2,
        log_every_n_steps=2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, OrderedDigits(batch_size=32), ckpt_path=ckpt_path)
    return model, callbacks


def _assert_equal_nested(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            _assert_equal_nested(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _events(folder: Path) -> dict[str, dict[str, list[tuple[int, Any]]]]:
    from tensorboard.backend.event_processing.event_accumulator import (
        HISTOGRAMS,
        IMAGES,
        SCALARS,
        TENSORS,
        EventAccumulator,
    )

    events = EventAccumulator(str(folder), size_guidance={SCALARS: 0, IMAGES: 0, HISTOGRAMS: 0, TENSORS: 0})
    events.Reload()
    tags = events.Tags()
    return {
        "scalars": {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags["scalars"]},
        "images": {t: [(e.step, (e.width, e.height)) for e in events.Images(t)] for t in tags["images"]},
        "histograms": {
            t: [(e.step, e.histogram_value.num) for e in events.Histograms(t)] for t in tags["histograms"]
        },
        "texts": {
            t: [(e.step, None) for e in events.Tensors(t)] for t in tags["tensors"] if t not in RESTATED
        },
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("resume")
    whole_model, whole = _run(root, "whole", 4)
    _run(root, "split", 2)
    checkpoint = root / "checkpoints_split" / "epoch=1-step=8.ckpt"
    assert checkpoint.exists(), sorted(p.name for p in (root / "checkpoints_split").iterdir())
    resumed_model, resumed = _run(root, "split", 4, ckpt_path=str(checkpoint))
    return {
        "root": root,
        "models": (whole_model, resumed_model),
        "callbacks": (whole, resumed),
        "events": (_events(root / "runs" / "whole"), _events(root / "runs" / "split")),
    }


def test_training_itself_resumes_exactly(runs: dict[str, Any]) -> None:
    # the premise of every comparison below
    whole, resumed = runs["models"]
    assert_same_weights(weights_of(whole), weights_of(resumed))


def test_probe_weights_are_bitwise_identical(runs: dict[str, Any]) -> None:
    # the online mode's Adam state: tests/test_linear_probe_monitor.py::test_resume_continues_bitwise
    whole, resumed = (callbacks[0] for callbacks in runs["callbacks"])
    assert isinstance(whole, LinearProbeMonitor) and whole.fit == "frozen"
    state_whole, state_resumed = whole.bank.state_dict(), resumed.bank.state_dict()
    assert state_whole["probes"], "the probes never trained"
    _assert_equal_nested(state_whole, state_resumed, "probe bank")
    _assert_equal_nested(whole.history, resumed.history, "probe history")
    assert all(len(curve) == 4 for curve in whole.history["val"].values())


def test_every_callback_state_continues(runs: dict[str, Any]) -> None:
    whole, resumed = runs["callbacks"]
    for a, b in zip(whole, resumed):
        assert type(a) is type(b)
        _assert_equal_nested(a.state_dict(), b.state_dict(), type(a).__name__)
    by_type = {type(c): c for c in resumed}
    assert by_type[SaliencyMonitor].dumps == 4 and by_type[RepresenterMonitor].dumps == 4
    assert by_type[GradFlowMonitor].power.state_dict(), "power iteration state is empty"
    assert isinstance(by_type[NormStatsMonitor], NormStatsMonitor)


@pytest.mark.parametrize("kind", ["scalars", "images", "histograms", "texts"])
def test_tensorboard_steps_continue_without_gaps_or_duplicates(runs: dict[str, Any], kind: str) -> None:
    whole, split = (events[kind] for events in runs["events"])
    assert whole, f"no {kind} written"
    assert whole.keys() == split.keys()
    assert any(tag.startswith(TAG_FAMILIES) for tag in whole), f"none of our {kind}"
    for tag, series in whole.items():
        steps = [step for step, _ in split[tag]]
        ours = tag.startswith(TAG_FAMILIES)
        assert len(steps) == len(set(steps)) or not ours, f"{tag}: duplicate steps {steps}"
        assert steps == [step for step, _ in series], f"{tag}: steps {steps} vs {[s for s, _ in series]}"
        if kind == "scalars" and not tag.endswith("seconds"):
            assert [v for _, v in split[tag]] == [v for _, v in series], f"{tag} values differ"
        if kind in ("images", "histograms"):
            assert split[tag] == series, f"{tag} differs"


def test_dump_files_continue(runs: dict[str, Any]) -> None:
    root = runs["root"] / "runs"
    names = {
        version: sorted(p.name for p in (root / version).glob("representer_epoch*.pt"))
        for version in ("whole", "split")
    }
    assert names["whole"] == names["split"] and len(names["whole"]) == 4, names


def test_run_summary_restated_at_the_resumed_step(runs: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator

    events = EventAccumulator(str(runs["root"] / "runs" / "split"), size_guidance={TENSORS: 0})
    events.Reload()
    assert [e.step for e in events.Tensors("summary/run/text_summary")] == [0, 8]


# ---- state versioning and keys, for every callback ------------------------------------------------------------
OTHER_CONFIG = {
    LinearProbeMonitor: {"lr": 0.05},
    NormStatsMonitor: {"every_n_epochs": 3},
    GradFlowMonitor: {"band": (1e-3, 1e3)},
    SaliencyMonitor: {"num_examples": 4},
    RepresenterMonitor: {"lam": 0.01},
}


@pytest.mark.parametrize("cls", list(OTHER_CONFIG), ids=lambda cls: cls.__name__)
def test_older_or_foreign_state_warns_and_starts_afresh(cls: type) -> None:
    callback = cls()
    fresh = callback.state_dict()
    for state in (
        {"version": 0},
        {"version": cls.STATE_VERSION + 1, "anything": 1},
        {"foreign": True},
        "garbage",
    ):
        with pytest.warns(UserWarning, match="starting this callback afresh"):
            callback.load_state_dict(state)  # type: ignore[arg-type]
        _assert_equal_nested(callback.state_dict(), fresh, f"{cls.__name__} after {state!r}")
    # the right version with a broken body: also a warning, not a crash
    with pytest.warns(UserWarning, match="could not restore"):
        callback.load_state_dict({"version": cls.STATE_VERSION})


@pytest.mark.parametrize("cls", list(OTHER_CONFIG), ids=lambda cls: cls.__name__)
def test_instances_with_other_configurations_keep_separate_state(cls: type) -> None:
    a, b, c = cls(), cls(**OTHER_CONFIG[cls]), cls()
    assert a.state_key != b.state_key and a.state_key == c.state_key
    assert cls.__name__ in a.state_key
