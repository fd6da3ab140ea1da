"""Side-by-side step-time and memory measurement shared by the benchmark scripts.

Step time is the wall time between consecutive ``on_train_batch_end`` calls of a timer callback placed after all
others, so it includes every callback's per-batch work. Configurations are run interleaved (A, B, A, B, ...) and the
median over steps and repeats is compared, so machine noise hits both sides alike.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning import Callback

torch.set_num_threads(max(1, int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))))

# Where the benchmarks run: set once from the command line by use_device() (--device, --precision).
DEVICE = "cpu"
PRECISION = "32-true"


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device cpu|cuda`` and ``--precision`` (Lightning's names: ``32-true``, ``bf16-mixed``, ``16-mixed``)."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed (default 32-true)")


def parse_with_device(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line with ``--device``/``--precision`` added, and take them for this run."""
    add_device_arguments(parser)
    args = parser.parse_args()
    use_device(args)
    return args


def use_device(args: argparse.Namespace) -> None:
    """Take ``--device``/``--precision`` for every Trainer and timer of this run; fail early without CUDA."""
    global DEVICE, PRECISION
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch build sees no CUDA device (torch.cuda.is_available() is False)")
    DEVICE, PRECISION = args.device, args.precision


def device_arguments() -> list[str]:
    """The command-line flags that give a child process this run's device and precision."""
    return ["--device", DEVICE, "--precision", PRECISION]


def trainer_options() -> dict[str, Any]:
    """Accelerator, devices and precision of the run, for ``L.Trainer(**trainer_options(), ...)``."""
    return {"accelerator": DEVICE, "devices": 1, "precision": PRECISION}


def synchronize(device: str | None = None) -> None:
    """Wait for the accelerator's queued work before a timer is read (nothing to wait for on the CPU)."""
    if (device or DEVICE) == "cuda":
        torch.cuda.synchronize()


def clock() -> float:
    """``time.perf_counter()`` after the device's queued work is done: what a GPU timer must read."""
    synchronize()
    return time.perf_counter()


class StepTimer(Callback):
    def __init__(self, warmup: int = 2) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self._last: float | None = None
        self._seen = 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = clock()
        if self._last is not None and self._seen >= self.warmup:
            self.times.append(now - self._last)
        self._last = now
        self._seen += 1


def run_steps(
    model_fn: Callable[[], L.LightningModule],
    datamodule_fn: Callable[[], L.LightningDataModule],
    callbacks_fn: Callable[[], Sequence[Callback]],
    steps: int,
    **trainer_kwargs: Any,
) -> list[float]:
    """Fit for ``steps`` training batches (no validation) and return the per-step times after warm-up."""
    L.seed_everything(0, verbose=False)
    timer = StepTimer()
    options: dict[str, Any] = dict(
        **trainer_options(), max_steps=steps, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    options.update(trainer_kwargs)
    trainer = L.Trainer(callbacks=[*callbacks_fn(), timer], **options)
    trainer.fit(model_fn(), datamodule=datamodule_fn())
    gc.collect()
    return timer.times


def compare(
    configs: dict[str, Callable[[], Sequence[Callback]]],
    model_fn: Callable[[], L.LightningModule],
    datamodule_fn: Callable[[], L.LightningDataModule],
    steps: int = 12,
    repeats: int = 3,
    **trainer_kwargs: Any,
) -> dict[str, float]:
    """Median step time per configuration, runs interleaved ``repeats`` times."""
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, callbacks_fn in configs.items():
            times[name] += run_steps(model_fn, datamodule_fn, callbacks_fn, steps, **trainer_kwargs)
    return {name: statistics.median(values) for name, values in times.items()}


def time_registered_hooks(manager: Any, timed: Callable[[Callable[..., Any], str], Callable[..., Any]]) -> None:
    """From now on, every hook registered through ``manager`` (a callback's ``HookManager``) runs as
    ``timed(hook, part)``, ``part`` one of ``"forward hooks"``, ``"forward pre-hooks"``, ``"gradient hooks"``."""
    forward, forward_pre, tensor = manager.forward, manager.forward_pre, manager.tensor

    def timed_forward(module: torch.nn.Module, hook: Callable[..., Any], with_kwargs: bool = False) -> Any:
        return forward(module, timed(hook, "forward hooks"), with_kwargs)

    def timed_forward_pre(module: torch.nn.Module, hook: Callable[..., Any], with_kwargs: bool = False) -> Any:
        return forward_pre(module, timed(hook, "forward pre-hooks"), with_kwargs)

    def timed_tensor(t: torch.Tensor, hook: Callable[[torch.Tensor], Any]) -> None:
        tensor(t, timed(hook, "gradient hooks"))

    manager.forward, manager.forward_pre, manager.tensor = timed_forward, timed_forward_pre, timed_tensor


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    """The machine a table was measured on, the GPU and precision included when the run is on one."""
    text = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if DEVICE == "cuda":
        text += f", {torch.cuda.get_device_name()}, precision {PRECISION}"
    return text


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
