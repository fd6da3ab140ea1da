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


class BasicBlock(torch.nn.Module):
    """torchvision's BasicBlock, written out: one in-place ReLU module used twice, a downsample branch."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TorchvisionStyleResNet(torch.nn.Module):
    """torchvision's ResNet layout (stem conv-bn-relu-maxpool, stages ``layer1``.. as nn.Sequential, avgpool, fc)
    at digits size, with a single-block last stage."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()  # 8x8 inputs: torchvision's 3x3/2 max-pool would leave too little
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, stride=2), BasicBlock(32, 32))
        self.layer3 = nn.Sequential(BasicBlock(32, 64, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet_module():  # type: ignore[no-untyped-def]
    from lightning_interp.models import ClassifierModule
    from torchmetrics.classification import MulticlassAccuracy

    class Wrapped(ClassifierModule):
        def __init__(self) -> None:
            super().__init__(lr=3e-3)
            self.net = TorchvisionStyleResNet()
            self.val_accuracy = MulticlassAccuracy(10, average="micro")

    return Wrapped()


@pytest.mark.slow
def test_a_torchvision_style_resnet_with_shared_inplace_relus(tmp_path: Path) -> None:
    from lightning_interp.data import DigitsDataModule

    blocks = ["net.layer1.0", "net.layer1.1", "net.layer2.0", "net.layer2.1", "net.layer3.0"]
    callbacks = the_suite()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, trainer = fit(callbacks, model_fn=_resnet_module, datamodule=DigitsDataModule(), max_epochs=2,
                             log_every_n_steps=5,
                             logger=TensorBoardLogger(str(tmp_path), name="resnet", version="", default_hp_metric=False))
        reference, _ = fit([], model_fn=_resnet_module, datamodule=DigitsDataModule(), max_epochs=2)
    assert_same_weights(weights_of(reference), weights_of(model))
    probes, representer = callbacks[0], callbacks[4]
    # the blocks (the single-block last stage included) after the stem's last module; inside-block ReLUs not
    assert [layer.name for layer in probes.resolved_layers] == ["input", "net.maxpool", *blocks]
    assert all(probes.history["val"][name][-1] > 0.5 for name in blocks)
    events = EventAccumulator(str(tmp_path / "resnet"), size_guidance={SCALARS: 0, IMAGES: 0})
    events.Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    for block in blocks:
        assert f"gradflow/{block}/grad_norm" in scalars and f"norm/{block}/act_std" in scalars
    assert {f"saliency/{method}/examples" for method in SALIENCY_METHODS} <= images
    assert representer.dumps >= 1 and representer.last["decomposition_residual"] < 1e-4
    assert count_hooks(model) == 0
