"""Every pass a callback makes over the training set at its defaults reads at most its cap, and the representer's
answers at its cap agree with a refit on the whole set as the docs state."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_interp.attribution import fit_representer, suspect_labels
from lightning_interp.callbacks import LinearProbeMonitor, RepresenterMonitor
from lightning_interp.examples import sample_batches
from torchmetrics.classification import MulticlassAccuracy

from lightning_interp.models import ClassifierModule

N, DIM, CLASSES = 9000, 8, 4


class CountingData(Dataset):
    """A synthetic classification set that counts the reads made while ``counting`` is on."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.y = torch.randint(CLASSES, (n,), generator=g)
        self.x = torch.randn(CLASSES, DIM, generator=g)[self.y] + torch.randn(n, DIM, generator=g)
        self.counting = False
        self.reads = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += self.counting
        return self.x[i], self.y[i]


class SmallMLP(ClassifierModule):
    def __init__(self) -> None:
        super().__init__(lr=1e-2)
        self.net = nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, CLASSES))
        self.val_accuracy = MulticlassAccuracy(CLASSES, average="micro")


def counted(hook: Callable[..., Any], data: CountingData) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        data.counting = True
        try:
            return hook(*args, **kwargs)
        finally:
            data.counting = False

    return wrapper


@pytest.mark.parametrize(
    ("make", "cap"), [(LinearProbeMonitor, 4096), (RepresenterMonitor, 8192)], ids=["probes", "representer"]
)
def test_default_training_set_passes_read_at_most_their_cap(make: type, cap: int) -> None:
    train, val = CountingData(N), CountingData(64)
    monitor = make()
    for name in ("on_validation_epoch_start", "on_train_epoch_end", "on_train_end", "on_fit_end"):
        if getattr(type(monitor), name) is not getattr(L.Callback, name):
            setattr(monitor, name, counted(getattr(monitor, name), train))
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, accelerator="cpu", logger=False, callbacks=[monitor],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(SmallMLP(), DataLoader(train, batch_size=16), DataLoader(val, batch_size=16))
    assert train.reads == cap  # exactly one pass at this one-epoch fit, capped (the set holds 9,000)


def _problem(n: int) -> tuple[torch.Tensor, ...]:
    """Penultimate features of an MLP trained on overlapping clusters with 10% flipped labels, and its head."""
    g = torch.Generator().manual_seed(0)
    means = 0.3 * torch.randn(10, 32, generator=g)
    y = torch.randint(10, (n + 256,), generator=g)
    x = means[y] + torch.randn(n + 256, 32, generator=g)
    flipped = torch.rand(n, generator=g) < 0.1
    noisy = torch.where(flipped, (y[:n] + torch.randint(1, 10, (n,), generator=g)) % 10, y[:n])
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
    head = nn.Linear(128, 10)
    opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=1e-3)
    for _ in range(3):
        for ids in torch.randperm(n, generator=g).split(128):
            opt.zero_grad()
            F.cross_entropy(head(body(x[ids])), noisy[ids]).backward()
            opt.step()
    with torch.no_grad():
        return body(x[:n]), body(x[n:]), noisy, flipped, head.weight.clone(), head.bias.clone()


def test_representer_answers_at_the_default_cap_agree_with_the_full_refit() -> None:
    features, test, labels, flipped, weight, bias = _problem(16384)
    cap = RepresenterMonitor().max_train_examples
    ids = torch.cat([i for _, i in sample_batches(CountingData(16384), cap, seed=0, batch_size=4096)])
    assert len(ids) == cap

    def refit(rows: torch.Tensor) -> Any:
        probs = torch.softmax(F.linear(features[rows], weight, bias).double(), dim=1)
        return fit_representer(features[rows], probs, init_weight=weight, init_bias=bias)

    full, sample = refit(torch.arange(16384)), refit(ids)
    full_logits, logits = full.logits(test), sample.logits(test)
    assert float((logits - full_logits).norm() / full_logits.norm()) < 0.01
    predicted = full_logits.argmax(1)
    assert float((logits.argmax(1) == predicted).double().mean()) >= 0.99
    # the top-4 proponents the monitor shows, among the sampled examples, are mostly those the full refit would pick
    ours = sample.values(test, classes=predicted).topk(4, 1).indices
    theirs = full.values(test, classes=predicted)[:, ids].topk(4, 1).indices
    shared = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ours, theirs)) / ours.numel()
    assert shared >= 0.8
    # suspect labels: as precise at the cap as on the whole set
    on_sample = float(flipped[ids][suspect_labels(features[ids], labels[ids], k=20).indices].double().mean())
    on_all = float(flipped[suspect_labels(features, labels, k=20).indices].double().mean())
    assert on_sample >= on_all - 0.15 and on_sample >= 0.7


def test_tensor_dataset_sample_is_what_collating_its_items_gives() -> None:
    """The one-indexing path for a TensorDataset yields exactly the batches the per-item path collates."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    tensors = (torch.randn(1000, 3, 4, 4, generator=g), torch.randint(10, (1000,), generator=g))

    class Items(Dataset):  # the same data, read item by item
        def __len__(self) -> int:
            return 1000

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return tensors[0][i], tensors[1][i]

    for cap, rank, world in ((None, 0, 1), (300, 0, 1), (300, 1, 2)):
        fast = list(sample_batches(TensorDataset(*tensors), cap, seed=3, batch_size=64, rank=rank, world_size=world))
        slow = list(sample_batches(Items(), cap, seed=3, batch_size=64, rank=rank, world_size=world))
        assert len(fast) == len(slow)
        for (batch_a, ids_a), (batch_b, ids_b) in zip(fast, slow):
            assert torch.equal(ids_a, ids_b)
            assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(batch_a, batch_b))
