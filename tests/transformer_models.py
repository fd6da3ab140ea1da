"""Small third-party and torch transformers for tests: Hugging Face BERT, GPT-2 and ViT built from tiny configs
(nothing downloaded), torch ``nn.TransformerEncoder`` classifiers (Post-LN and Pre-LN), an attention-free
residual MLP with RMSNorm-like library classes, each wrapped in a LightningModule trained on synthetic dict
batches. Dropout is 0 unless asked for, so a second forward of a copy reproduces the training step's exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_interp.batches import logits_of

VOCAB, SEQ, HIDDEN, CLASSES = 50, 12, 16, 3


def tiny_bert(dropout: float = 0.0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=CLASSES,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)  # fmt: skip
    return BertForSequenceClassification(config)


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=32, num_labels=CLASSES,
                        pad_token_id=0, bos_token_id=1, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)  # fmt: skip
    return GPT2ForSequenceClassification(config)


def tiny_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=CLASSES, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)  # fmt: skip
    return ViTForImageClassification(config)


class EncoderClassifier(nn.Module):
    """Token embedding, ``nn.TransformerEncoder`` (Post-LN or Pre-LN with a final norm), first-token head; its
    ``forward(input_ids, attention_mask=None)`` is the Hugging Face calling convention."""

    def __init__(self, norm_first: bool, num_layers: int = 2, d_model: int = HIDDEN, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 2, 2 * d_model, dropout=dropout, batch_first=True,
                                           norm_first=norm_first)  # fmt: skip
        final = nn.LayerNorm(d_model) if norm_first else None
        self.encoder = nn.TransformerEncoder(layer, num_layers, norm=final, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        padding = None if attention_mask is None else attention_mask == 0
        return self.head(self.encoder(self.embed(input_ids), src_key_padding_mask=padding)[:, 0])


class T5LayerNorm(nn.Module):
    """Hugging Face's T5 norm, written out: a weight, ``variance_epsilon``, no bias, no mean subtraction."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


class LlamaRMSNorm(T5LayerNorm):
    """Hugging Face's Llama norm: the same computation under an ``*RMSNorm`` name."""


class MixerBlock(nn.Module):
    """An attention-free residual block: ``x + MLP(norm(x))`` with an RMSNorm-like library norm."""

    def __init__(self, d: int, norm: type[nn.Module]) -> None:
        super().__init__()
        self.norm = norm(d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class AttentionFreeClassifier(nn.Module):
    def __init__(self, d: int = HIDDEN) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList([MixerBlock(d, T5LayerNorm), MixerBlock(d, LlamaRMSNorm)])
        self.norm = LlamaRMSNorm(d)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


class DictClassifier(L.LightningModule):
    """Wraps a model that takes a dict batch's inputs by keyword (``input_ids``/``attention_mask`` or
    ``pixel_values``); the loss is cross-entropy on its logits against ``labels``."""

    def __init__(self, make: Callable[[], nn.Module], lr: float = 1e-2) -> None:
        super().__init__()
        self.model = make()
        self.lr = lr

    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.model(**inputs)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return F.cross_entropy(logits_of(self.model(**inputs)), batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class SyntheticDicts(torch.utils.data.Dataset):
    """Seeded synthetic examples as dicts: token ids with an attention mask (the last tokens of every other
    example padded, id 0) or images, and labels."""

    def __init__(self, kind: str, n: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)
        self.kind = kind
        if kind == "pixels":
            self.pixels = torch.randn(n, 3, 8, 8, generator=g)
        else:
            self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
            self.mask = torch.ones(n, SEQ, dtype=torch.long)
            self.mask[1::2, SEQ - 3 :] = 0
            self.ids[self.mask == 0] = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.kind == "pixels":
            return {"pixel_values": self.pixels[i], "labels": self.labels[i]}
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class SyntheticDataModule(L.LightningDataModule):
    def __init__(self, kind: str, n: int = 32, batch_size: int = 8, shuffle: bool = False) -> None:
        super().__init__()
        self.kind, self.n, self.batch_size, self.shuffle = kind, n, batch_size, shuffle

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(SyntheticDicts(self.kind, self.n), batch_size=self.batch_size,
                                           shuffle=self.shuffle)  # fmt: skip


#: name -> (model factory, input kind, block names, stem name, one LayerNorm checked by hand)
MODELS: dict[str, tuple[Callable[[], nn.Module], str, list[str], str, str]] = {
    "bert": (tiny_bert, "tokens", ["model.bert.encoder.layer.0", "model.bert.encoder.layer.1"],
             "model.bert.embeddings", "model.bert.encoder.layer.1.output.LayerNorm"),
    "gpt2": (tiny_gpt2, "tokens", ["model.transformer.h.0", "model.transformer.h.1"], "model.transformer.drop",
             "model.transformer.h.1.ln_2"),
    "vit": (tiny_vit, "pixels", ["model.vit.layers.0", "model.vit.layers.1"], "model.vit.embeddings",
            "model.vit.layers.1.layernorm_before"),
    "post-ln": (lambda: EncoderClassifier(norm_first=False), "tokens",
                ["model.encoder.layers.0", "model.encoder.layers.1"], "model.embed", "model.encoder.layers.1.norm2"),
    "pre-ln": (lambda: EncoderClassifier(norm_first=True), "tokens",
               ["model.encoder.layers.0", "model.encoder.layers.1"], "model.embed", "model.encoder.norm"),
}  # fmt: skip
