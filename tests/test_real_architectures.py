"""Every callback at its defaults on models nobody here wrote: Hugging Face BERT, GPT-2 and ViT built from tiny
configs (nothing downloaded) and torch's own ``nn.TransformerEncoder`` (Post-LN and Pre-LN), trained on dict batches
(``input_ids``/``attention_mask``/``labels`` or ``pixel_values``/``labels``) through a LightningModule whose
``forward`` takes keyword arguments, as users write them."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

from lightning_interp.callbacks import (
    GradFlowMonitor,
    LinearProbeMonitor,
    NormStatsMonitor,
    RepresenterMonitor,
    SaliencyMonitor,
)
from lightning_interp.hooks import count_hooks
from tests.helpers import assert_same_weights, fit, weights_of
from tests.transformer_models import MODELS, DictClassifier, SyntheticDataModule, SyntheticDicts

pytest.importorskip("transformers")

SALIENCY_METHODS = ("saliency", "smoothgrad", "integrated_gradients")  # SaliencyMonitor's defaults


class WithValidation(SyntheticDataModule):
    """Synthetic dict batches for training and, from another seed, for validation."""

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(SyntheticDicts(self.kind, 16, seed=1), batch_size=8)


class Classifier(DictClassifier):
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))


def the_suite() -> list:
    return [LinearProbeMonitor(), NormStatsMonitor(), GradFlowMonitor(), SaliencyMonitor(), RepresenterMonitor()]


def fit_suite(name: str, root: Path, callbacks: list | None = None, dropout_model=None):  # type: ignore[no-untyped-def]
    make, kind, _, _, _ = MODELS[name]
    callbacks = the_suite() if callbacks is None else callbacks
    logger = TensorBoardLogger(str(root), name=name, version="", default_hp_metric=False) if callbacks else False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, trainer = fit(
            callbacks, model_fn=lambda: Classifier(dropout_model or make), datamodule=WithValidation(kind, n=32),
            max_epochs=2, log_every_n_steps=1, logger=logger,
        )  # fmt: skip
    return model, trainer, callbacks


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("real_architectures")
    out = {}
    for name in MODELS:
        model, trainer, callbacks = fit_suite(name, root)
        events = EventAccumulator(str(root / name), size_guidance={SCALARS: 0, IMAGES: 0})
        events.Reload()
        out[name] = {"model": model, "trainer": trainer, "callbacks": {type(c).__name__: c for c in callbacks},
                     "scalars": set(events.Tags()["scalars"]), "images": set(events.Tags()["images"])}  # fmt: skip
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_the_suite_at_defaults(runs: dict, name: str) -> None:
    _, kind, blocks, stem, _ = MODELS[name]
    run = runs[name]
    assert run["trainer"].current_epoch == 2, "the fit did not finish"
    probes = run["callbacks"]["LinearProbeMonitor"]
    # probes on exactly the residual stream: the input where it is a float tensor, the embedding, every block
    expected = (["input"] if kind == "pixels" else []) + [stem] + blocks
    assert [layer.name for layer in probes.resolved_layers] == expected
    assert probes.not_fired == []
    for split in ("train", "val"):  # every announced layer has a probe and a reading at each epoch
        assert sorted(probes.history[split]) == sorted(expected)
        assert all(len(curve) == 2 for curve in probes.history[split].values())
    for layer in expected:
        assert f"probe/val_acc/{layer}" in run["scalars"]
    # saliency maps for text (token strips) and images (grids), every default method
    for method in SALIENCY_METHODS:
        assert f"saliency/{method}/examples" in run["images"], f"no {method} picture"
    # the representer refit on the head's inputs
    representer = run["callbacks"]["RepresenterMonitor"]
    assert representer.dumps >= 1 and representer.last["decomposition_residual"] < 1e-4
    # gradient flow per block, and the statistics of the normalization layers inside them
    for block in blocks:
        assert f"gradflow/{block}/grad_norm" in run["scalars"]
        assert f"gradflow/{block}/param_grad_norm" in run["scalars"]
    norms = [tag for tag in run["scalars"] if re.fullmatch(r"norm/.+/effective_gain", tag) and "total" not in tag]
    assert norms, "no normalization statistics"
    # nothing left on the model
    assert count_hooks(run["model"]) == 0
    assert all(len(c.hooks) == 0 for c in run["callbacks"].values())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "pre-ln"])
def test_zero_interference_with_the_whole_suite(tmp_path: Path, name: str) -> None:
    """Bitwise-identical weights with and without every callback, dropout on (an RNG draw of ours would show)."""
    from tests.transformer_models import EncoderClassifier, tiny_bert

    dropped = (lambda: tiny_bert(dropout=0.1)) if name == "bert" else (lambda: EncoderClassifier(True, dropout=0.1))
    reference, _, _ = fit_suite(name, tmp_path / "without", callbacks=[], dropout_model=dropped)
    watched, _, _ = fit_suite(name, tmp_path / "with", dropout_model=dropped)
    assert_same_weights(weights_of(reference), weights_of(watched))


def _readme_block(title: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index(title) :]
    return section[section.index("```python") + len("```python") : section.index("```", section.index("```python") + 3)]


def test_the_readme_hugging_face_lines_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = _readme_block("### Hugging Face models")
    monkeypatch.chdir(tmp_path)  # its logs go to ./lightning_logs
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.current_epoch == namespace["trainer"].max_epochs
    probes = next(c for c in trainer.callbacks if isinstance(c, LinearProbeMonitor))
    assert [layer.name for layer in probes.resolved_layers][:2] == ["model.bert.embeddings", "model.bert.encoder.layer.0"]
    assert all(len(curve) == trainer.max_epochs for curve in probes.history["val"].values())
