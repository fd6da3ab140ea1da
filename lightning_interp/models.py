"""Small reference networks: the digits CNN of the demo, a deep MLP for normalization experiments, a
ResNet-18-sized CNN for benchmarks (each in BatchNorm / LayerNorm / GroupNorm / no-normalization variants),
and the digits transformer of the transformer demo (Post-LN / Pre-LN / Pre-RMSNorm / no-normalization
variants)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_interp._validation import check_choice, check_positive_float, check_positive_int
from lightning_interp.errors import LightningInterpError

__all__ = [
    "Norm",
    "NORM_VARIANTS",
    "ClassifierModule",
    "DigitsCNN",
    "DeepMLP",
    "ResNet18",
    "TransformerNorm",
    "TRANSFORMER_NORM_VARIANTS",
    "DigitsTransformer",
]

Norm = Literal["batch", "layer", "group", "none"]
NORM_VARIANTS: tuple[str, ...] = ("batch", "layer", "group", "none")


def norm_layer(norm: str, channels: int, spatial: tuple[int, ...] = ()) -> nn.Module:
    """A normalization layer for ``channels`` features (with ``spatial`` extent for conv maps)."""
    if norm == "batch":
        return nn.BatchNorm2d(channels) if spatial else nn.BatchNorm1d(channels)
    if norm == "layer":
        return nn.LayerNorm([channels, *spatial]) if spatial else nn.LayerNorm(channels)
    if norm == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


class ClassifierModule(LightningModule):
    """A LightningModule around ``self.net``: cross-entropy, Adam, and ``val_acc`` / ``val_loss`` logging.

    Subclasses build ``self.net`` and ``self.val_accuracy`` in their ``__init__``.

    Example:
        >>> class Tiny(ClassifierModule):
        ...     def __init__(self):
        ...         super().__init__(lr=0.1)
        ...         self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        ...         self.val_accuracy = MulticlassAccuracy(10, average="micro")
        >>> Tiny()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net: nn.Module = nn.Identity()
        self.val_accuracy: MulticlassAccuracy | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_accuracy.update(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", self.val_accuracy, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class DigitsCNN(ClassifierModule):
    """A small CNN for 8x8 digits: three conv blocks and a hidden dense layer, with a choice of normalization.

    Hidden layers (the default probe targets) are ``net.relu1`` .. ``net.relu4``.

    Example:
        >>> model = DigitsCNN(norm="layer")
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, norm: Norm = "batch", num_classes: int = 10, dropout: float = 0.0, lr: float = 3e-3) -> None:
        super().__init__(lr=lr)
        check_choice("norm", norm, NORM_VARIANTS)
        self.save_hyperparameters()
        self.norm = norm
        self.net = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(1, 16, 3, padding=1),
                norm1=norm_layer(norm, 16, (8, 8)),
                relu1=nn.ReLU(),
                conv2=nn.Conv2d(16, 32, 3, padding=1),
                norm2=norm_layer(norm, 32, (8, 8)),
                relu2=nn.ReLU(),
                pool=nn.MaxPool2d(2),
                conv3=nn.Conv2d(32, 64, 3, padding=1),
                norm3=norm_layer(norm, 64, (4, 4)),
                relu3=nn.ReLU(),
                gap=nn.AdaptiveAvgPool2d(2),
                flatten=nn.Flatten(),
                fc1=nn.Linear(256, 64),
                norm4=norm_layer(norm, 64),
                relu4=nn.ReLU(),
                dropout=nn.Dropout(dropout),
                fc2=nn.Linear(64, num_classes),
            )
        )
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")


class DeepMLP(ClassifierModule):
    """``depth`` hidden blocks Linear -> norm -> activation, for watching gradients vanish or not.

    Example:
        >>> model = DeepMLP(depth=4, width=16, norm="batch")
        >>> model(torch.zeros(3, 64)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        depth: int = 20,
        width: int = 64,
        norm: Norm = "none",
        activation: Literal["tanh", "relu"] = "tanh",
        in_features: int = 64,
        num_classes: int = 10,
        lr: float = 1e-3,
    ) -> None:
        super().__init__(lr=lr)
        check_positive_int("depth", depth)
        check_positive_int("width", width)
        check_choice("norm", norm, NORM_VARIANTS)
        check_choice("activation", activation, ("tanh", "relu"))
        self.save_hyperparameters()
        blocks: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        features = in_features
        for i in range(depth):
            blocks[f"fc{i}"] = nn.Linear(features, width)
            blocks[f"norm{i}"] = norm_layer(norm, width)
            blocks[f"act{i}"] = nn.Tanh() if activation == "tanh" else nn.ReLU()
            features = width
        blocks["head"] = nn.Linear(features, num_classes)
        self.net = nn.Sequential(blocks)
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, spatial: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm_layer(norm, c_out, (spatial, spatial))
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = norm_layer(norm, c_out, (spatial, spatial))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm_layer(norm, c_out, (spatial, spatial))
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet18(ClassifierModule):
    """ResNet-18 for 3x32x32 inputs (CIFAR layout: 3x3 stem, no max-pool), 11M parameters, for benchmarks.

    Example:
        >>> ResNet18(width=8)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, width: int = 64, norm: Norm = "batch", lr: float = 1e-3) -> None:
        super().__init__(lr=lr)
        check_choice("norm", norm, NORM_VARIANTS)
        self.save_hyperparameters()
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            stem=nn.Conv2d(3, width, 3, padding=1, bias=False),
            stem_norm=norm_layer(norm, width, (32, 32)),
            stem_relu=nn.ReLU(),
        )
        c_in, spatial = width, 32
        for stage, mult in enumerate((1, 2, 4, 8)):
            c_out = width * mult
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                spatial //= stride
                layers[f"stage{stage + 1}_{block}"] = _BasicBlock(c_in, c_out, stride, norm, spatial)
                c_in = c_out
        layers["gap"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten()
        layers["fc"] = nn.Linear(c_in, num_classes)
        self.net = nn.Sequential(layers)
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")


TransformerNorm = Literal["postln", "preln", "rmsnorm", "none"]
TRANSFORMER_NORM_VARIANTS: tuple[str, ...] = ("postln", "preln", "rmsnorm", "none")


def _transformer_norm(norm: str, width: int) -> nn.Module:
    if norm in ("postln", "preln"):
        return nn.LayerNorm(width)
    if norm == "rmsnorm":
        return nn.RMSNorm(width)
    return nn.Identity()


class _RowTokens(nn.Module):
    """``(B, 1, H, W)`` images -> ``(B, H, width)`` tokens: each pixel row linearly embedded, plus a learned
    position embedding per row."""

    def __init__(self, rows: int, columns: int, width: int) -> None:
        super().__init__()
        self.rows, self.columns = rows, columns
        self.proj = nn.Linear(columns, width)
        self.position = nn.Parameter(torch.randn(1, rows, width) * 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images.reshape(images.shape[0], self.rows, self.columns)) + self.position


class _SelfAttention(nn.Module):
    """Multi-head self-attention with its projections as ``nn.Linear`` modules (``nn.MultiheadAttention``
    calls its output projection functionally, so hooks on it never fire)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, head width)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head width)
        return self.proj(attended.transpose(1, 2).reshape(batch, tokens, width))


class _TransformerBlock(nn.Module):
    """One encoder block: self-attention and a GELU MLP, each a residual branch, with the normalization where
    ``norm`` puts it: after each residual add (``postln``), at the entry of each branch (``preln``,
    ``rmsnorm``), or nowhere (``none``)."""

    def __init__(self, width: int, heads: int, mlp_width: int, norm: str, dropout: float) -> None:
        super().__init__()
        self.post_norm = norm == "postln"
        self.norm1 = _transformer_norm(norm, width)
        self.attn = _SelfAttention(width, heads)
        self.norm2 = _transformer_norm(norm, width)
        self.mlp = nn.Sequential(
            OrderedDict(fc1=nn.Linear(width, mlp_width), act=nn.GELU(), fc2=nn.Linear(mlp_width, width))
        )
        self.dropout = nn.Dropout(dropout)  # on each branch's output, before the residual add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:  # Vaswani et al. 2017: x = LN(x + F(x))
            x = self.norm1(x + self.dropout(self.attn(x)))
            return self.norm2(x + self.dropout(self.mlp(x)))
        # Pre-LN (Xiong et al. 2020): x = x + F(LN(x)); the norms are Identity for "none"
        x = x + self.dropout(self.attn(self.norm1(x)))
        return x + self.dropout(self.mlp(self.norm2(x)))


class DigitsTransformer(ClassifierModule):
    """A small transformer classifier for 8x8 digits read as a sequence of 8 row tokens, in four normalization
    variants: ``"postln"`` (LayerNorm after each residual add, the original Transformer), ``"preln"``
    (LayerNorm at the entry of each residual branch and once after the last block), ``"rmsnorm"``
    (``nn.RMSNorm`` in the Pre-LN places) and ``"none"``.

    It takes the ``(B, 1, 8, 8)`` image batch the CNN takes (so the data module, saliency maps and every
    callback work unchanged) and cuts it into tokens itself: each pixel row is a token of 8 features (rows,
    not 2x2 patches: a row is a stroke profile, and 8 tokens keep attention cheap), embedded by ``net.embed``
    (a linear map plus a learned position embedding), then ``depth`` blocks ``net.blocks.0`` ..
    ``net.blocks.<depth-1>`` in an ``nn.ModuleList``, ``net.final_norm`` (LayerNorm / RMSNorm for the Pre
    variants, ``Identity`` otherwise: a Post-LN block already ends in a LayerNorm), the mean over tokens (what
    a probe on a block output sees too) and ``net.head``. The callbacks' default hidden layers are
    ``net.embed`` and the blocks.

    ``dropout`` acts on each residual branch's output. Optimised with AdamW (``lr``, ``weight_decay``) and a
    linear learning-rate warm-up over ``warmup_steps`` optimizer steps (0: none), the same for every variant.

    Example:
        >>> from lightning_interp.layers import select_layers
        >>> model = DigitsTransformer(norm="preln", depth=2)
        >>> model(torch.zeros(3, 1, 8, 8)).shape
        torch.Size([3, 10])
        >>> [layer.name for layer in select_layers(model)]
        ['input', 'net.embed', 'net.blocks.0', 'net.blocks.1']
        >>> post = DigitsTransformer(norm="postln")
        >>> type(model.net.final_norm).__name__, type(post.net.final_norm).__name__
        ('LayerNorm', 'Identity')
    """

    def __init__(
        self,
        norm: TransformerNorm = "preln",
        depth: int = 8,
        width: int = 64,
        heads: int = 4,
        mlp_ratio: int = 2,
        num_classes: int = 10,
        image_size: tuple[int, int] = (8, 8),
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(lr=lr)
        check_choice("norm", norm, TRANSFORMER_NORM_VARIANTS)
        check_positive_int("depth", depth)
        check_positive_int("heads", heads)
        check_positive_int("mlp_ratio", mlp_ratio)
        check_positive_int("warmup_steps", warmup_steps, minimum=0)
        if not 0.0 <= check_positive_float("dropout", dropout, allow_zero=True) < 1.0:
            raise LightningInterpError(f"Expected argument `dropout` to be in [0, 1), but got {dropout!r}.")
        if check_positive_int("width", width) % heads:
            raise LightningInterpError(
                f"Expected argument `width` to be a multiple of `heads` ({heads}), but got {width}."
            )
        self.save_hyperparameters()
        self.norm = norm
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        rows, columns = image_size
        net = nn.Module()
        net.embed = _RowTokens(rows, columns, width)
        net.blocks = nn.ModuleList(
            _TransformerBlock(width, heads, mlp_ratio * width, norm, dropout) for _ in range(depth)
        )
        net.final_norm = _transformer_norm(norm, width) if norm in ("preln", "rmsnorm") else nn.Identity()
        net.head = nn.Linear(width, num_classes)
        self.net = net
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        h = net.embed(x)
        for block in net.blocks:
            h = block(h)
        return net.head(net.final_norm(h).mean(dim=1))

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        warmup = self.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
