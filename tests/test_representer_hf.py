"""RepresenterMonitor on models nobody here wrote: Hugging Face BERT, GPT-2 and ViT classifiers built from small
configs, and torch's nn.TransformerEncoder, trained on dict batches. The features the monitor refits on are checked
against the models' own hidden states computed here without hooks; the refit's health, zero interference, hook
hygiene and the paths where the monitor must stay idle without stopping the fit."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_weights, count_hooks, quiet_trainer, weights_of
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_interp.callbacks import RepresenterMonitor
from lightning_interp.callbacks.representer_monitor import _head_features, _HeadInputError
from lightning_interp.errors import LightningInterpError

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, CLASSES, PAD = 50, 3, 0
#: token 40 + c marks class c: a label a small transformer learns in a few epochs
MARKER = 40


# ---- data: variable-length token sequences, padded by the collate function ----------------------------------------
class TokenSequences(Dataset):
    """Sequences of 4-12 random tokens in [3, 40) with one class marker token at a random position."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(4, 13, (1,), generator=g))
            ids = torch.randint(3, MARKER, (length,), generator=g)
            label = int(torch.randint(CLASSES, (1,), generator=g))
            ids[int(torch.randint(length, (1,), generator=g))] = MARKER + label
            self.items.append({"input_ids": ids, "labels": label})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class PadCollate:
    """Pads a list of token items to the longest (on ``padding_side``) with an attention mask (picklable, for
    ``ddp_spawn``)."""

    def __init__(self, padding_side: str = "right", token_type_ids: bool = False) -> None:
        self.padding_side, self.token_type_ids = padding_side, token_type_ids

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            where = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            ids[row, where], mask[row, where] = item["input_ids"], 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([i["labels"] for i in items])}
        if self.token_type_ids:
            batch["token_type_ids"] = torch.zeros_like(ids)
        return batch


class TokenData(L.LightningDataModule):
    def __init__(self, n_train: int = 192, n_val: int = 48, with_val: bool = True, **collate: Any) -> None:
        super().__init__()
        self.train_set, self.val_set = TokenSequences(n_train, 0), TokenSequences(n_val, 1)
        self.with_val, self.collate = with_val, PadCollate(**collate)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=32, shuffle=True, collate_fn=self.collate)

    def val_dataloader(self) -> Any:
        return DataLoader(self.val_set, batch_size=32, collate_fn=self.collate) if self.with_val else []


class DigitImages(Dataset):
    """Random class-conditional 8x8 images as Hugging Face image batches (``pixel_values``, ``labels``)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        means = torch.randn((CLASSES, 1, 8, 8), generator=torch.Generator().manual_seed(7))
        self.labels = torch.randint(CLASSES, (n,), generator=g)
        self.pixels = means[self.labels] + 0.5 * torch.randn((n, 1, 8, 8), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


class ImageData(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(DigitImages(160, 0), batch_size=32, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(DigitImages(48, 1), batch_size=32)


# ---- models ---------------------------------------------------------------------------------------------------
class HFClassifier(L.LightningModule):
    """What a user writes around a Hugging Face classifier: forward(**batch), the model's own loss."""

    def __init__(self, model: nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def bert() -> HFClassifier:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=CLASSES)  # fmt: skip
    return HFClassifier(transformers.BertForSequenceClassification(config))


def gpt2() -> HFClassifier:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                     num_labels=CLASSES, pad_token_id=PAD)  # fmt: skip
    return HFClassifier(transformers.GPT2ForSequenceClassification(config))


def vit() -> HFClassifier:
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, num_labels=CLASSES)  # fmt: skip
    return HFClassifier(transformers.ViTForImageClassification(config))


class EncoderClassifier(L.LightningModule):
    """torch's nn.TransformerEncoder over token embeddings, mean over real tokens, a linear head."""

    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.position = nn.Parameter(0.1 * torch.randn(32, 16))
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=not norm_first)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        x = self.embed(input_ids) + self.position[: input_ids.shape[1]]
        hidden = self.encoder(x, src_key_padding_mask=mask == 0)
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class PooledLogitsGPT2(HFClassifier):
    """A head on every position whose logits are averaged over the real tokens: no position gives the logits."""

    def __init__(self) -> None:
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2)
        super().__init__(transformers.GPT2Model(config))
        self.score = nn.Linear(16, CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        per_token = self.score(self.model(input_ids, attention_mask=attention_mask).last_hidden_state)
        return (per_token * attention_mask.unsqueeze(-1)).sum(1) / attention_mask.sum(1, keepdim=True)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        pass


class TokenTagger(PooledLogitsGPT2):
    """Per-token logits (token classification): nothing per example to explain."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.score(self.model(input_ids, attention_mask=attention_mask).last_hidden_state)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits.flatten(0, 1), batch["input_ids"].flatten() % CLASSES)


# ---- independent features: the models' own hidden states, no hooks ------------------------------------------------
def bert_reference(module: HFClassifier, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The classifier's input in eval mode: the pooler output (dropout is the identity)."""
    out = module.model.bert(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                            token_type_ids=batch.get("token_type_ids"))  # fmt: skip
    return out.pooler_output


def gpt2_reference(module: HFClassifier, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The final layer norm's output (the last of ``output_hidden_states``) at each sequence's last real token,
    found from the attention mask."""
    mask = batch["attention_mask"]
    out = module.model.transformer(batch["input_ids"], attention_mask=mask, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    assert torch.equal(hidden, out.last_hidden_state)
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    last_real = (positions * mask).argmax(1)
    return hidden[torch.arange(len(mask)), last_real]


def vit_reference(module: HFClassifier, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return module.model.vit(batch["pixel_values"]).last_hidden_state[:, 0]


def encoder_reference(module: EncoderClassifier, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = batch["attention_mask"]
    x = module.embed(batch["input_ids"]) + module.position[: mask.shape[1]]
    hidden = module.encoder(x, src_key_padding_mask=mask == 0)
    return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)


class FeatureSpy:
    """Wraps the monitor's per-batch feature reader: for every batch it reads (training pass, validation examples,
    sparse pool), the same batch's reference features are computed at that moment and the largest gap is kept."""

    def __init__(self, monitor: RepresenterMonitor, reference: Any) -> None:
        self.original, self.reference = monitor._batch_features, reference
        self.gap, self.rows, self.calls = 0.0, 0, 0
        monitor._batch_features = self  # type: ignore[method-assign]

    def __call__(self, pl_module: L.LightningModule, batch: Any) -> torch.Tensor:
        features = self.original(pl_module, batch)
        inputs = {batch.key: batch.inputs, **batch.extras}
        with torch.no_grad():
            expected = self.reference(pl_module, inputs).float()
        assert features.shape == expected.shape, (features.shape, expected.shape)
        self.gap = max(self.gap, float((features - expected).abs().max()))
        self.rows += len(features)
        self.calls += 1
        return features


def run(model_fn: Any, data: L.LightningDataModule, monitor: RepresenterMonitor | None, logger: Any = False,
        max_epochs: int = 2, seed: int = 0) -> tuple[L.LightningModule, L.Trainer, float]:  # fmt: skip
    L.seed_everything(seed, verbose=False)
    model = model_fn()
    trainer = quiet_trainer([monitor] if monitor else [], max_epochs=max_epochs, logger=logger)
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return model, trainer, time.perf_counter() - started


def assert_healthy_refit(monitor: RepresenterMonitor, n_train: int) -> None:
    last = monitor.last
    assert monitor.dumps >= 1 and monitor.idle is None, monitor.problems.counts
    assert not monitor.problems.counts.get("dump_failed"), monitor.problems.counts
    assert torch.equal(last["indices"], torch.arange(n_train))
    assert last["stationarity"] <= 1e-8, last["stationarity"]
    assert last["decomposition_residual"] < 1e-5, last["decomposition_residual"]
    assert last["agreement"] >= 0.95, last["agreement"]


# ---- the tests ------------------------------------------------------------------------------------------------
def test_bert_features_are_the_pooler_output_and_refit_is_exact(tmp_path):
    monitor = RepresenterMonitor()  # defaults: the end-of-fit dump falls on epoch 2
    spy = FeatureSpy(monitor, bert_reference)
    data = TokenData(token_type_ids=True)
    logger = TensorBoardLogger(str(tmp_path), name="bert")
    _, trainer, _ = run(bert, data, monitor, logger=logger)
    assert_healthy_refit(monitor, len(data.train_set))
    assert torch.equal(monitor.last["labels"], torch.tensor([item["labels"] for item in data.train_set.items]))
    assert spy.rows >= len(data.train_set) + len(data.val_set) and spy.gap <= 1e-6, spy.gap
    # token inputs: the examples come as a text table with each example's first real token ids
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    assert "representer/examples" not in events.Tags()["images"]
    table = events.Tensors("representer/examples/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert table.startswith("| example | label | predicted | tokens | proponents | opponents |"), table[:200]
    shown = monitor._examples
    row0 = table.splitlines()[2]
    ids = shown.inputs[0][shown.attention_mask[0].bool()]
    assert "`" + " ".join(str(int(t)) for t in ids[:12]) in row0, row0
    assert f"({len(ids)} tokens)" in row0


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_gpt2_features_are_the_last_real_token_and_refit_is_exact(padding_side):
    monitor = RepresenterMonitor()
    spy = FeatureSpy(monitor, gpt2_reference)
    data = TokenData(padding_side=padding_side)
    _, _, seconds = run(gpt2, data, monitor)
    assert_healthy_refit(monitor, len(data.train_set))
    assert spy.rows >= len(data.train_set) + len(data.val_set) and spy.gap <= 1e-6, spy.gap
    # the sequences really differ in length, so the last real token is not one column
    lengths = torch.tensor([len(item["input_ids"]) for item in data.train_set.items])
    assert lengths.min() < lengths.max()


def test_vit_dump_done_with_image_grid(tmp_path):
    monitor = RepresenterMonitor()
    spy = FeatureSpy(monitor, vit_reference)
    logger = TensorBoardLogger(str(tmp_path), name="vit")
    run(vit, ImageData(), monitor, logger=logger)
    assert_healthy_refit(monitor, 160)
    assert spy.gap <= 1e-6, spy.gap
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "representer/examples" in events.Tags()["images"]


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_dump_done(norm_first):
    monitor = RepresenterMonitor()
    spy = FeatureSpy(monitor, encoder_reference)
    data = TokenData()
    run(lambda: EncoderClassifier(norm_first), data, monitor)
    assert_healthy_refit(monitor, len(data.train_set))
    assert spy.gap <= 1e-5, spy.gap


def test_bert_zero_interference_and_hooks_gone():
    plain, _, _ = run(bert, TokenData(token_type_ids=True), None)
    monitor, seen = RepresenterMonitor(every_n_epochs=1), []

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(count_hooks(pl_module))

    L.seed_everything(0, verbose=False)
    model = bert()
    before = count_hooks(model)
    trainer = quiet_trainer([monitor, Count()], max_epochs=2)
    trainer.fit(model, datamodule=TokenData(token_type_ids=True))
    assert monitor.dumps == 2
    assert_same_weights(weights_of(plain), weights_of(model))
    assert set(seen) == {before + 1} and count_hooks(model) == before and len(monitor.hooks) == 0


def test_bert_without_validation_data():
    monitor = RepresenterMonitor()
    data = TokenData(with_val=False, token_type_ids=True)
    with pytest.warns(UserWarning, match="no validation data"):
        run(bert, data, monitor)
    assert_healthy_refit(monitor, len(data.train_set))
    assert "examples" not in monitor.last and "suspects" in monitor.last


@pytest.mark.parametrize("model_fn, why", [(PooledLogitsGPT2, "no position's head output equals the logits"),
                                           (TokenTagger, "not one row of 3 per example")])  # fmt: skip
def test_head_input_not_per_example_warns_once_and_idles(model_fn, why):
    monitor = RepresenterMonitor(every_n_epochs=1)
    with pytest.warns(UserWarning, match=f"{why}.*`layer=`") as caught:
        _, trainer, _ = run(model_fn, TokenData(), monitor, max_epochs=3)
    assert sum("RepresenterMonitor" in str(w.message) for w in caught) == 1
    assert trainer.current_epoch == 3 and monitor.dumps == 0 and monitor.idle is not None
    assert monitor.problems.counts["head_input"] == 1 and not monitor.problems.counts.get("dump_failed")
    assert len(monitor.hooks) == 0


def test_explicit_bad_layer_raises_at_setup():
    with pytest.raises(LightningInterpError, match="`layer`.*model.classifier"):
        run(bert, TokenData(), RepresenterMonitor(layer="model.nope"))
    with pytest.raises(LightningInterpError, match="`layer`.*nn.Linear.*Tanh"):
        run(bert, TokenData(), RepresenterMonitor(layer="model.bert.pooler.activation"))


def test_head_features_reads_the_models_position_back():
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(4, 3)
    x = torch.randn(5, 6, 4, generator=g)
    out = head(x)
    picked = torch.tensor([0, 5, 2, 2, 3])
    features = _head_features(x, out, out[torch.arange(5), picked], 5)
    assert torch.equal(features, x[torch.arange(5), picked])
    assert torch.equal(_head_features(x[:, 0], out[:, 0], None, 5), x[:, 0])  # (B, D): the input itself
    with pytest.raises(_HeadInputError, match="no position"):
        _head_features(x, out, out.mean(1), 5)
    with pytest.raises(_HeadInputError, match="shape"):
        _head_features(x, out, out, 5)
    nan_logits = out[torch.arange(5), picked].clone()
    nan_logits[1] = math.nan
    with pytest.raises(LightningInterpError) as caught:
        _head_features(x, out, nan_logits, 5)
    assert not isinstance(caught.value, _HeadInputError)  # a bad batch, not a property of the head


# ---- DDP: the ranks agree on the verdict before any gather -------------------------------------------------------
class PoolsOnRank1LaterGPT2(HFClassifier):
    """GPT-2 classifier whose rank 1, from the second epoch on, returns logits pooled over positions in eval mode:
    only that rank finds no position matching, and both ranks must go idle together."""

    def forward(self, **batch: torch.Tensor) -> Any:
        out = self.model(**batch)
        if self.global_rank == 1 and self.current_epoch >= 1 and not self.training:
            return out.logits + 1.0  # the head's output at no position
        return out


class SaveRank(L.Callback):
    def __init__(self, monitor: RepresenterMonitor, directory: str) -> None:
        self.monitor, self.directory = monitor, directory

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        m = self.monitor
        torch.save({"dumps": m.dumps, "idle": m.idle, "problems": dict(m.problems.counts), "hooks": len(m.hooks),
                    "indices": m.last.get("indices"), "residual": m.last.get("decomposition_residual"),
                    "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()
                                if k.startswith("representer/")}},
                   f"{self.directory}/rank{trainer.global_rank}.pt")  # fmt: skip


@pytest.mark.skipif(__import__("sys").platform != "linux", reason="gloo process group test written for Linux CI")
@pytest.mark.timeout(300)
def test_ddp_gathers_both_shares_then_idles_together(tmp_path):
    monitor = RepresenterMonitor(every_n_epochs=1)
    data = TokenData()
    trainer = quiet_trainer([monitor, SaveRank(monitor, str(tmp_path))], strategy="ddp_spawn", devices=2,
                            max_epochs=2)  # fmt: skip
    L.seed_everything(0, verbose=False)
    trainer.fit(PoolsOnRank1LaterGPT2(gpt2().model), datamodule=data)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for rank in ranks:
        # epoch 0: both shares gathered (every training example once, in index order), refit exact
        assert rank["dumps"] == 1 and torch.equal(rank["indices"], torch.arange(len(data.train_set)))
        assert rank["residual"] < 1e-5
        # epoch 1: rank 1 alone finds the head's input not per example; both go idle, warned once, hooks gone
        assert rank["idle"] and rank["problems"].get("head_input") == 1 and not rank["problems"].get("dump_failed")
        assert rank["hooks"] == 0
    assert "no position's head output" in ranks[1]["idle"] and "another process" in ranks[0]["idle"]
    assert ranks[0]["metrics"].keys() == ranks[1]["metrics"].keys()
    assert math.isnan(ranks[0]["metrics"]["representer/stationarity"])
