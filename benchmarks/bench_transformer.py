"""The suite's cost on a BERT-base-shaped encoder (Hugging Face ``BertForSequenceClassification`` built from a config:
12 blocks, hidden 768, 12 heads, intermediate 3072, sequence 128, batch 16, vocabulary 30,522; synthetic tokens),
measured side by side in one run.

* Step time of each callback, and of the suite, at its defaults: interleaved fits with ``log_every_n_steps=2`` so
  that logged and unlogged steps are timed alike; the cost at Lightning's default ``log_every_n_steps=50`` is the
  amortized ratio ``(49 x unlogged + 1 x logged) / (50 x baseline)``.
* The periodic work, timed inside the callbacks and set against an epoch of 200 steps (3,200 examples): one
  SaliencyMonitor dump, one LinearProbeMonitor frozen fit (its own pass over its fitting sample of the 3,200
  examples + the L-BFGS fits), one RepresenterMonitor dump (a pass over the training set + the refit).

    python benchmarks/bench_transformer.py                # BERT-base shape
    python benchmarks/bench_transformer.py --blocks 4     # fewer blocks when a step takes too long
    python benchmarks/bench_transformer.py --quick        # 2 blocks, hidden 256, sequence 64 (a smoke run)
    python benchmarks/bench_transformer.py --no-periodic --steps 9   # step times only, more samples
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import clock, machine, parse_with_device, table, trainer_options  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from lightning_interp.callbacks import (  # noqa: E402
    GradFlowMonitor,
    LinearProbeMonitor,
    NormStatsMonitor,
    RepresenterMonitor,
    SaliencyMonitor,
)
from lightning_interp.callbacks.norm_stats_monitor import logged_step  # noqa: E402

EPOCH_STEPS = 200


class Tokens(Dataset):
    """Seeded synthetic token sequences with a learnable label (a planted token)."""

    def __init__(self, n: int, length: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.ids[self.labels == 1, length // 3] = 2

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[i]}


class Classifier(L.LightningModule):
    def __init__(self, shape: dict[str, int]) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["blocks"],
                            num_attention_heads=shape["heads"], intermediate_size=4 * shape["hidden"],
                            max_position_embeddings=max(512, shape["length"]), num_labels=2)  # fmt: skip
        self.model = BertForSequenceClassification(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class StepTimes(L.Callback):
    """Wall time of each training step (batch start to batch end, every other callback's work included), split
    into the steps Lightning logs and the others. Placed first and last in the callback list."""

    def __init__(self, warmup: int = 1) -> None:
        self.warmup = warmup
        self.logged: list[float] = []
        self.unlogged: list[float] = []
        self._start = 0.0
        self._logged = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        self._start, self._logged = clock(), logged_step(trainer)

    def end(self, trainer, batch_idx: int) -> None:  # type: ignore[no-untyped-def]
        if batch_idx >= self.warmup:
            (self.logged if self._logged else self.unlogged).append(clock() - self._start)


class StepEnd(L.Callback):
    def __init__(self, times: StepTimes) -> None:
        self.times = times

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.times.end(trainer, batch_idx)


def loaders(shape: dict[str, int], n_train: int) -> tuple[DataLoader, DataLoader]:
    train = Tokens(n_train, shape["length"], shape["vocab"], seed=0)
    val = Tokens(2 * shape["batch"], shape["length"], shape["vocab"], seed=1)
    return DataLoader(train, batch_size=shape["batch"], shuffle=False), DataLoader(val, batch_size=shape["batch"])


def run_fit(shape: dict[str, int], callbacks: list, steps: int, n_train: int, logger: Any = False,
            log_every_n_steps: int = 2) -> StepTimes:  # fmt: skip
    L.seed_everything(0, verbose=False)
    times = StepTimes()
    trainer = L.Trainer(max_steps=steps, **trainer_options(), logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1, log_every_n_steps=log_every_n_steps,
                        callbacks=[times, *callbacks, StepEnd(times)])  # fmt: skip
    train, val = loaders(shape, n_train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Classifier(shape), train, val)
    return times


CONFIGS = {
    "without": lambda: [],
    "LinearProbeMonitor": lambda: [LinearProbeMonitor()],
    "NormStatsMonitor": lambda: [NormStatsMonitor()],
    "GradFlowMonitor": lambda: [GradFlowMonitor()],
    "NormStats + GradFlow": lambda: [NormStatsMonitor(), GradFlowMonitor()],
    "all five": lambda: [LinearProbeMonitor(), NormStatsMonitor(), GradFlowMonitor(), SaliencyMonitor(),
                         RepresenterMonitor()],
}


def step_costs(shape: dict[str, int], steps: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (unlogged, logged) step seconds per configuration, fits interleaved ``repeats`` times. Only as many
    training examples as the steps use, so the suite's end-of-fit passes stay out of the step times."""
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in CONFIGS}
    for _ in range(repeats):
        for name, make in CONFIGS.items():
            measured = run_fit(shape, make(), steps, n_train=shape["batch"] * steps)
            times[name][0].extend(measured.unlogged)
            times[name][1].extend(measured.logged)
    return {name: (statistics.median(u), statistics.median(lg)) for name, (u, lg) in times.items()}


def timed(cls: type) -> type:
    """``cls`` with the wall time of each of its periodic calls recorded in ``seconds``."""
    method = "_fit_frozen" if cls is LinearProbeMonitor else "_dump"

    def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        start = clock()
        getattr(super(subclass, self), method)(*args, **kwargs)
        self.seconds.append(clock() - start)

    subclass = type(f"Timed{cls.__name__}", (cls,), {method: wrapper})
    return subclass


def periodic_costs(shape: dict[str, int], tmp: Path) -> dict[str, float]:
    """Seconds of one periodic call per callback, on a training set of an epoch of 200 steps (the passes read the
    dataset directly; only two steps are trained)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    out = {}
    for cls in (SaliencyMonitor, LinearProbeMonitor, RepresenterMonitor):
        monitor = timed(cls)()
        monitor.seconds = []
        logger = TensorBoardLogger(str(tmp), name=cls.__name__, default_hp_metric=False)
        run_fit(shape, [monitor], steps=2, n_train=shape["batch"] * EPOCH_STEPS, logger=logger)
        out[cls.__name__] = statistics.median(monitor.seconds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="training steps per fit (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-periodic", action="store_true", help="step times only")
    args = parse_with_device(parser)
    shape = dict(vocab=30522, hidden=768, heads=12, blocks=args.blocks, length=128, batch=16)
    if args.quick:
        shape.update(hidden=256, heads=4, blocks=2, length=64)
    costs = step_costs(shape, args.steps, args.repeats)
    base = costs["without"][0]
    rows = []
    for name, (unlogged, logged) in costs.items():
        amortized = (49 * unlogged + logged) / (50 * base)
        rows.append([name, f"{unlogged:.2f}", f"{logged:.2f}", f"{unlogged / base:.3f}x", f"{logged / base:.3f}x",
                     f"{amortized:.3f}x"])  # fmt: skip
    import tempfile

    periodic = {}
    if not args.no_periodic:
        with tempfile.TemporaryDirectory() as tmp:
            periodic = periodic_costs(shape, Path(tmp))
    epoch = EPOCH_STEPS * base
    print(f"\nMachine: {machine()}")
    print(f"Model: BertForSequenceClassification, {shape['blocks']} blocks, hidden {shape['hidden']}, "
          f"{shape['heads']} heads, sequence {shape['length']}, batch {shape['batch']}, vocabulary {shape['vocab']}\n")
    print(table(rows, ["callbacks (defaults)", "unlogged step s", "logged step s", "unlogged ratio", "logged ratio",
                       "amortized at log_every_n_steps=50"]))  # fmt: skip
    if not periodic:
        return
    print(f"\nPeriodic work against an epoch of {EPOCH_STEPS} steps ({EPOCH_STEPS * shape['batch']:,} examples, "
          f"{epoch:.0f} s at the baseline step):\n")
    print(table([[name, f"{s:.1f}", f"{100 * s / epoch:.1f}%"] for name, s in periodic.items()],
                ["callback (one periodic call)", "seconds", "of an epoch"]))  # fmt: skip


if __name__ == "__main__":
    main()
