"""What a whole ``trainer.fit`` costs with every callback of the package at its defaults, against without them.

Two models, each fitted ``--rounds`` times per configuration, interleaved (without, suite, without, suite, ...):

(a) the digits demo CNN (BatchNorm), 10 epochs, the bundled digits, batch 64, validation every epoch;
(b) a ResNet-18-style CNN (width 32) on synthetic 3x32x32 data, 3 epochs of 50 steps (batch 128), a validation set
    of 1,600 examples.

Both use a TensorBoardLogger (the suite's images are written) and Lightning's default ``log_every_n_steps=50``. The
ratio is the median of the suite's fit wall times over the median without. Where the extra time goes comes from a
clock wrapped around every callback method Lightning calls and every hook the callbacks register (their
``HookManager``), each call filed under one family: unlogged training steps, logged training steps, validation,
the ends of training epochs, the start and the end of fit. Calls nest (a monitor's own pass runs its forward hooks);
only the outermost call counts, so the families add up to the time spent in our code, independent of how noisy
the machine is. What is left of the wall-time difference is Lightning's side of our work (dispatching hooks,
writing our scalars).

    python benchmarks/bench_suite.py                    # both models, 3 rounds
    python benchmarks/bench_suite.py --model digits     # one of them
    python benchmarks/bench_suite.py --quick            # 1 round, 3 digits epochs, ResNet width 16 (a smoke run)
    python benchmarks/bench_suite.py --device cuda --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import clock, machine, parse_with_device, table, time_registered_hooks, trainer_options  # noqa: E402

import lightning as L  # noqa: E402
from lightning import Callback  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from lightning_interp.callbacks.norm_stats_monitor import logged_step  # noqa: E402
from lightning_interp.data import DigitsDataModule, SyntheticImageDataModule  # noqa: E402
from lightning_interp.models import DigitsCNN, ResNet18  # noqa: E402

FAMILIES = ("unlogged steps", "logged steps", "validation", "epoch ends", "start of fit", "end of fit")
STEP_HOOKS = {"on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
              "on_before_optimizer_step", "on_before_zero_grad"}  # fmt: skip
START_HOOKS = {"setup", "on_fit_start", "on_train_start", "on_sanity_check_start", "on_sanity_check_end"}
END_HOOKS = {"on_train_end", "on_fit_end", "teardown", "on_exception"}


def suite() -> list[Callback]:
    """One instance of every callback the package has, at its defaults."""
    module = importlib.import_module("lightning_interp.callbacks")
    return [getattr(module, name)() for name in module.__all__]


class SuiteClock:
    """Seconds spent in the callbacks' code, per (callback, family) and per (callback, method), outermost calls
    only. ``phase`` is the family of whatever the trainer is doing; a :class:`PhaseTracker` keeps it current."""

    def __init__(self) -> None:
        self.phase = "start of fit"
        self.depth = 0
        self.families: defaultdict[tuple[str, str], float] = defaultdict(float)
        self.methods: defaultdict[tuple[str, str], float] = defaultdict(float)

    def family_of(self, method: str) -> str:
        if method in STEP_HOOKS:
            return self.phase if self.phase in ("unlogged steps", "logged steps") else "unlogged steps"
        if method.startswith("on_validation") or method.startswith("on_sanity"):
            return "validation"
        if method in ("on_train_epoch_start", "on_train_epoch_end"):
            return "epoch ends"
        if method in START_HOOKS:
            return "start of fit"
        if method in END_HOOKS:
            return "end of fit"
        return self.phase

    def wrap(self, fn: Callable[..., Any], owner: str, method: str, lightning_hook: bool) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.depth:
                return fn(*args, **kwargs)
            family = self.family_of(method) if lightning_hook else self.phase
            self.depth += 1
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = clock() - start
                self.depth -= 1
                self.families[(owner, family)] += elapsed
                self.methods[(owner, method)] += elapsed

        return timed

    def instrument(self, callback: Callback) -> None:
        """Time every Lightning hook ``callback`` overrides and every module/tensor hook it registers."""
        owner = type(callback).__name__
        for name in dir(Callback):
            if (name.startswith("on_") or name in ("setup", "teardown")) and getattr(type(callback), name) is not getattr(Callback, name):
                setattr(callback, name, self.wrap(getattr(callback, name), owner, name, lightning_hook=True))
        time_registered_hooks(callback.hooks, lambda hook, part: self.wrap(hook, owner, part, lightning_hook=False))  # type: ignore[attr-defined]


class PhaseTracker(Callback):
    """Placed first: keeps ``clock.phase`` on what the trainer is doing."""

    def __init__(self, clock: SuiteClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.clock.phase = "logged steps" if logged_step(trainer) else "unlogged steps"

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self.clock.phase = "validation"

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self.clock.phase = "epoch ends"

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.clock.phase = "end of fit"


def setups(quick: bool) -> dict[str, tuple[Callable[[], L.LightningModule], Callable[[], Any], int]]:
    width = 16 if quick else 32
    return {
        "digits": (lambda: DigitsCNN(), lambda: DigitsDataModule(batch_size=64), 3 if quick else 10),
        "resnet": (lambda: ResNet18(width=width),
                   lambda: SyntheticImageDataModule(num_examples=128 * 50, batch_size=128), 1 if quick else 3),
    }  # fmt: skip


def fit_once(setup: tuple, with_suite: bool, root: Path) -> tuple[float, SuiteClock]:
    model_fn, datamodule_fn, epochs = setup
    L.seed_everything(0, verbose=False)
    ledger = SuiteClock()
    callbacks: list[Callback] = [PhaseTracker(ledger)]
    if with_suite:
        for callback in suite():
            ledger.instrument(callback)
            callbacks.append(callback)
    trainer = L.Trainer(
        max_epochs=epochs, **trainer_options(), callbacks=callbacks,
        logger=TensorBoardLogger(save_dir=str(root), name="suite" if with_suite else "without"),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    model, datamodule = model_fn(), datamodule_fn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = clock()
        trainer.fit(model, datamodule=datamodule)
    return clock() - start, ledger


def measure(name: str, setup: tuple, rounds: int) -> None:
    walls: dict[bool, list[float]] = {False: [], True: []}
    clocks: list[SuiteClock] = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for with_suite in (False, True):
                wall, ledger = fit_once(setup, with_suite, Path(tmp))
                walls[with_suite].append(wall)
                if with_suite:
                    clocks.append(ledger)
    base, ours = statistics.median(walls[False]), statistics.median(walls[True])
    owners = sorted({owner for clock in clocks for owner, _ in clock.families})
    per = {key: statistics.median(c.families.get(key, 0.0) for c in clocks)
           for key in {k for c in clocks for k in c.families}}  # fmt: skip
    rows = []
    for owner in owners:
        cells = [per.get((owner, family), 0.0) for family in FAMILIES]
        rows.append([owner, *[f"{s:.2f}" for s in cells], f"{sum(cells):.2f}", f"{100 * sum(cells) / base:.1f}%"])
    totals = [sum(per.get((o, f), 0.0) for o in owners) for f in FAMILIES]
    rows.append(["**all**", *[f"{s:.2f}" for s in totals], f"{sum(totals):.2f}", f"{100 * sum(totals) / base:.1f}%"])
    print(f"\n### {name}: {setup[2]} epochs, {rounds} rounds; device {common.DEVICE}, precision {common.PRECISION}\n")
    print(f"fit without: {base:.2f} s (rounds: {', '.join(f'{w:.2f}' for w in walls[False])})  ")
    print(f"fit with the suite: {ours:.2f} s (rounds: {', '.join(f'{w:.2f}' for w in walls[True])})  ")
    print(f"**whole-fit ratio {ours / base:.3f}x**; time in our code {sum(totals):.2f} s = "
          f"{1 + sum(totals) / base:.3f}x of the fit without; remainder (Lightning's side, noise) "
          f"{ours - base - sum(totals):+.2f} s\n")  # fmt: skip
    print(table(rows, ["callback (median seconds per fit)", *FAMILIES, "total s", "of the fit without"]))
    methods = defaultdict(list)
    for clock in clocks:
        for key, seconds in clock.methods.items():
            methods[key].append(seconds)
    top = sorted(((statistics.median(v), k) for k, v in methods.items()), reverse=True)[:8]
    print("\nLargest single places (median seconds per fit):\n")
    print(table([[owner, method, f"{s:.2f}"] for s, (owner, method) in top], ["callback", "method", "s"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("digits", "resnet", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parse_with_device(parser)
    rounds = args.rounds or (1 if args.quick else 3)
    print(f"Machine: {machine()}; callbacks: {', '.join(type(c).__name__ for c in suite())}")
    for name, setup in setups(args.quick).items():
        if args.model in (name, "both"):
            measure(name, setup, rounds)


if __name__ == "__main__":
    main()
