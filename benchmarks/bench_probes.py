"""LinearProbeMonitor cost, measured side by side in one run:

1. per training step: step-time ratio with the monitor (default ``fit="frozen"``: nothing on a training step; and
   ``fit="online"``: one probe step per batch) against without it, interleaved, medians;
2. per epoch: the frozen fit (the monitor's own eval-mode pass over its fixed training sample, plus the L-BFGS fits),
   timed inside the callback, against the time of a training epoch of the same model;
3. whole fit: ``trainer.fit`` wall time of the digits demo model (10 epochs, validation every epoch) with the
   monitor against without it, interleaved, medians.

Peak memory: each configuration in its own child process.

    python benchmarks/bench_probes.py            # digits CNN + ResNet-18 (width 64) on 3x32x32, batch 128
    python benchmarks/bench_probes.py --quick    # ResNet-18 at width 16, fewer steps
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import clock, compare, device_arguments, machine, parse_with_device, run_steps, table, trainer_options  # noqa: E402

import lightning as L  # noqa: E402

from lightning_interp.callbacks import LinearProbeMonitor  # noqa: E402
from lightning_interp.data import DigitsDataModule, SyntheticImageDataModule  # noqa: E402
from lightning_interp.models import DigitsCNN, ResNet18  # noqa: E402


def setups(quick: bool) -> dict:
    width = 16 if quick else 64
    return {
        "digits CNN (batch 64)": (lambda: DigitsCNN(), lambda: DigitsDataModule(batch_size=64), 20),
        f"ResNet-18 w{width} 3x32x32 (batch 128)": (
            lambda: ResNet18(width=width),
            lambda: SyntheticImageDataModule(num_examples=128 * 16, batch_size=128),
            8 if quick else 10,
        ),
    }


CONFIGS = {
    "without": lambda: [],
    "frozen (default)": lambda: [LinearProbeMonitor()],
    "online": lambda: [LinearProbeMonitor(fit="online")],
}


class TimedFits(LinearProbeMonitor):
    """The default monitor, with the wall time of each frozen fit (pass + L-BFGS) recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.fit_seconds: list[float] = []

    def _fit_frozen(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        start = clock()
        super()._fit_frozen(trainer, pl_module)
        self.fit_seconds.append(clock() - start)


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self._start = clock()

    def on_validation_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self.seconds.append(clock() - self._start)  # the training part of the epoch


def epoch_cost(model_fn, dm_fn, epochs: int) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    """(median frozen-fit seconds, median training-epoch seconds, examples in the fitting sample)."""
    monitor, timer = TimedFits(), EpochTimer()
    L.seed_everything(0, verbose=False)
    dm = dm_fn()
    trainer = L.Trainer(max_epochs=epochs, **trainer_options(), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1, callbacks=[timer, monitor])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model_fn(), datamodule=dm)
    examples = min(monitor.fit_examples, len(dm.train_dataset))
    return statistics.median(monitor.fit_seconds), statistics.median(timer.seconds), examples


def whole_fit(repeats: int) -> dict[str, float]:
    """Median wall time of the digits demo model's fit (10 epochs, validation each epoch), interleaved."""
    times: dict[str, list[float]] = {"without": [], "with LinearProbeMonitor": []}
    for _ in range(repeats):
        for name, callbacks in (("without", []), ("with LinearProbeMonitor", [LinearProbeMonitor()])):
            L.seed_everything(0, verbose=False)
            trainer = L.Trainer(max_epochs=10, **trainer_options(), logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)  # fmt: skip
            start = clock()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.fit(DigitsCNN(), datamodule=DigitsDataModule())
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def child(setup_name: str, config: str, quick: bool) -> None:
    model_fn, dm_fn, steps = setups(quick)[setup_name]
    run_steps(model_fn, dm_fn, CONFIGS[config], steps)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_memory(setup_name: str, config: str, quick: bool) -> float:
    args = [sys.executable, __file__, "--child", setup_name, config, *device_arguments()] + (["--quick"] if quick else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2)
    args = parse_with_device(parser)
    if args.child:
        child(*args.child, args.quick)
        return
    step_rows, epoch_rows = [], []
    for name, (model_fn, dm_fn, steps) in setups(args.quick).items():
        medians = compare(CONFIGS, model_fn, dm_fn, steps=steps, repeats=args.repeats)
        base = medians["without"]
        mem = {c: peak_memory(name, c, args.quick) for c in CONFIGS}
        step_rows.append([name, f"{base * 1e3:.1f}"] + [
            f"{medians[c] * 1e3:.1f} ({medians[c] / base:.3f}x)" for c in CONFIGS if c != "without"
        ] + [f"{mem[c] / mem['without']:.3f}x" for c in CONFIGS if c != "without"])  # fmt: skip
        fit_s, epoch_s, examples = epoch_cost(model_fn, dm_fn, epochs=2 if "ResNet" in name else 5)
        epoch_rows.append([name, examples, f"{fit_s:.3f}", f"{epoch_s:.2f}", f"{100 * fit_s / epoch_s:.1f}%"])
    fits = whole_fit(args.repeats)
    base, probed = fits["without"], fits["with LinearProbeMonitor"]
    print(f"\nMachine: {machine()}\n")
    print("Per training step (medians of interleaved runs; peak RSS each in its own process):\n")
    print(table(step_rows, ["setup", "step ms without", "frozen (default): ms (ratio)", "online: ms (ratio)",
                            "peak memory frozen", "peak memory online"]))  # fmt: skip
    print("\nPer epoch: one frozen fit (own eval-mode pass over the fitting sample + L-BFGS), against the training "
          "part of an epoch:\n")  # fmt: skip
    print(table(epoch_rows, ["setup", "fitting sample", "frozen fit s", "training epoch s", "fit / epoch"]))
    print(f"\nWhole fit, digits CNN, 10 epochs with validation: {base:.2f} s without, {probed:.2f} s with the "
          f"monitor at defaults: {probed / base:.2f}x (medians of {args.repeats}).")


if __name__ == "__main__":
    main()
