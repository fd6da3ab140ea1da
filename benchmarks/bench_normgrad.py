"""NormStatsMonitor / GradFlowMonitor overhead on the ResNet-18 synthetic benchmark (3x32x32, batch 128):
step-time ratio with/without each monitor and with both, side by side in one run (interleaved repeats).

    python benchmarks/bench_normgrad.py            # ResNet-18 at width 64
    python benchmarks/bench_normgrad.py --quick    # width 16, fewer steps
    python benchmarks/bench_normgrad.py --account  # time inside the monitors, per step (precise; see below)

Both monitors work only on steps whose metrics Lightning writes (``log_every_n_steps``, default 50); the other
steps pay a flag check. So two numbers per configuration: the median step time at the default frequency (an
unlogged step), and the median step time with ``log_every_n_steps=1`` (every step logged), each as a ratio to
the baseline of the same interleaved comparison. The amortized ratio at the default frequency is ``(49 *
unlogged ratio + logged ratio) / 50``. No logger is attached, so the per-epoch TensorBoard histograms and
figure are not timed (they happen once an epoch, outside the step).

``--account`` measures the overhead directly instead of as a difference of two noisy step times: in one process
it trains without callbacks and with both monitors, at ``log_every_n_steps=50`` (every measured step unlogged)
and ``=1`` (every step logged), and times with ``perf_counter`` everything the monitors run inside a step: their
Lightning hooks (wrapped on the instances), every function they register through their ``HookManager``
(forward, pre-forward and gradient hooks, wrapped at registration) and, nested in those, their
``pl_module.log`` calls (Lightning's own per-call cost, part of ours). The monitors' time and the step time come
from the same steps, so machine noise moves both alike and the ratio ``1 + ours / baseline step`` stays precise.
Not inside the timers: PyTorch's slower module-call path when a module has hooks at all; it is measured with a
no-op hook on ``nn.Identity`` and added, per hook call counted, to the unlogged cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from common import clock, compare, machine, parse_with_device, table, time_registered_hooks, trainer_options  # noqa: E402
from lightning import Callback  # noqa: E402

from lightning_interp.callbacks import GradFlowMonitor, NormStatsMonitor  # noqa: E402
from lightning_interp.callbacks.norm_stats_monitor import logged_step  # noqa: E402
from lightning_interp.data import SyntheticImageDataModule  # noqa: E402
from lightning_interp.models import ResNet18  # noqa: E402

CONFIGS = {
    "without": lambda: [],
    "NormStatsMonitor": lambda: [NormStatsMonitor()],
    "GradFlowMonitor": lambda: [GradFlowMonitor()],
    "both": lambda: [NormStatsMonitor(), GradFlowMonitor()],
}
DEFAULT_EVERY = 50
# the per-step Lightning hooks a monitor may implement (on_train_start etc. run once, outside the steps)
STEP_HOOKS = (
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
    "on_train_epoch_end",
)


# ---- accounting mode
# -------------------------------------------------------------------------------------------------
class MonitorClock:
    """Wall time spent inside the monitors' code, per monitor and per part, accumulated until :meth:`take`.

    Calls nest (a monitor's ``pl_module.log`` runs inside its ``on_train_batch_end``): a monitor's total counts
    only the outermost call; the parts are a breakdown.
    """

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.totals: defaultdict[str, float] = defaultdict(float)
        self.parts: defaultdict[tuple[str, str], float] = defaultdict(float)
        self.calls: defaultdict[tuple[str, str], int] = defaultdict(int)

    def wrap(self, fn: Callable[..., Any], owner: str, part: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.stack.append(owner)
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = clock() - start
                self.stack.pop()
                self.parts[(owner, part)] += elapsed
                self.calls[(owner, part)] += 1
                if not self.stack:
                    self.totals[owner] += elapsed

        return timed

    def wrap_log(self, log: Callable[..., Any]) -> Callable[..., Any]:
        """``pl_module.log``, timed only when a monitor calls it (the model's own ``train_loss`` is not ours)."""

        def timed_log(*args: Any, **kwargs: Any) -> Any:
            if not self.stack:
                return log(*args, **kwargs)
            return self.wrap(log, self.stack[-1], "pl_module.log")(*args, **kwargs)

        return timed_log

    def take(self) -> tuple[dict[str, float], dict[tuple[str, str], float], dict[tuple[str, str], int]]:
        taken = dict(self.totals), dict(self.parts), dict(self.calls)
        self.totals.clear()
        self.parts.clear()
        self.calls.clear()
        return taken


def instrument(monitor: Callback, clock: MonitorClock) -> None:
    """Time ``monitor``'s per-step Lightning hooks and every hook it registers through its HookManager."""
    owner = type(monitor).__name__
    for name in STEP_HOOKS:
        if getattr(type(monitor), name) is not getattr(Callback, name):
            setattr(monitor, name, clock.wrap(getattr(monitor, name), owner, name))
    time_registered_hooks(monitor.hooks, lambda hook, part: clock.wrap(hook, owner, part))  # type: ignore[attr-defined]


class StepLedger(Callback):
    """Placed after every other callback: per training step (between consecutive ``on_train_batch_end``), the
    wall time, whether Lightning logged it, and the monitors' time in it."""

    def __init__(self, clock: MonitorClock) -> None:
        self.clock = clock
        self.steps: list[dict[str, Any]] = []
        self._last: float | None = None
        self._logged = False

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._logged = logged_step(trainer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = clock()
        totals, parts, calls = self.clock.take()
        if self._last is not None:  # the first step is the warm-up: no window before it
            self.steps.append(
                {"time": now - self._last, "logged": self._logged, "totals": totals, "parts": parts, "calls": calls}
            )
        self._last = now


def hook_dispatch_cost(calls: int = 20000) -> float:
    """Seconds PyTorch adds to one module call when the module has a forward hook that returns at once."""
    module = torch.nn.Identity()
    x = torch.zeros(1)

    def per_call() -> float:
        start = clock()
        for _ in range(calls):
            module(x)
        return (clock() - start) / calls

    plain = min(per_call() for _ in range(3))
    handle = module.register_forward_hook(lambda m, a, o: None)
    hooked = min(per_call() for _ in range(3))
    handle.remove()
    return max(0.0, hooked - plain)


def account_run(
    width: int, steps: int, every: int, with_monitors: bool
) -> tuple[list[dict[str, Any]], list[str]]:
    """Fit ``steps`` measured steps (+ 1 warm-up) and return the ledger's steps and the monitors' names."""
    L.seed_everything(0, verbose=False)
    clock = MonitorClock()
    monitors: list[Callback] = [NormStatsMonitor(), GradFlowMonitor()] if with_monitors else []
    for monitor in monitors:
        instrument(monitor, clock)
    ledger = StepLedger(clock)
    model = ResNet18(width=width)
    model.log = clock.wrap_log(model.log)  # type: ignore[method-assign]
    trainer = L.Trainer(
        **trainer_options(), max_steps=steps + 1, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=every, callbacks=[*monitors, ledger],
    )  # fmt: skip
    trainer.fit(model, datamodule=SyntheticImageDataModule(num_examples=128 * 16, batch_size=128))
    return ledger.steps, [type(m).__name__ for m in monitors]


def account(width: int, steps: int) -> None:
    dispatch = hook_dispatch_cost()
    started = clock()
    runs = {}
    for every in (DEFAULT_EVERY, 1):
        for with_monitors in (False, True):
            runs[(every, with_monitors)] = account_run(width, steps, every, with_monitors)
            ledger = runs[(every, with_monitors)][0]
            print(
                f"  log_every_n_steps={every}, {'both monitors' if with_monitors else 'without'}: "
                f"steps {[round(s['time'], 2) for s in ledger]} s, "
                f"logged {sum(s['logged'] for s in ledger)}/{len(ledger)}",
                flush=True,
            )
    baseline = {every: statistics.median(s["time"] for s in runs[(every, False)][0]) for every in (DEFAULT_EVERY, 1)}
    names = runs[(DEFAULT_EVERY, True)][1]

    def per_step(every: int, owners: list[str]) -> tuple[float, float, float, int]:
        """Median over the steps of: our time, our pl_module.log time, the step time; forward-hook calls."""
        steps_ = runs[(every, True)][0]
        ours = statistics.median(sum(s["totals"].get(o, 0.0) for o in owners) for s in steps_)
        log = statistics.median(sum(s["parts"].get((o, "pl_module.log"), 0.0) for o in owners) for s in steps_)
        step = statistics.median(s["time"] for s in steps_)
        hook_calls = max(
            sum(n for (o, part), n in s["calls"].items() if o in owners and part.startswith("forward"))
            for s in steps_
        )
        return ours, log, step, hook_calls

    rows, detail = [], []
    for label, owners in [*((name, [name]) for name in names), ("both", names)]:
        unlogged, _, step_u, calls_u = per_step(DEFAULT_EVERY, owners)
        unlogged += calls_u * dispatch  # the slower module-call path of hooked modules, outside our timers
        logged, log_time, step_l, _ = per_step(1, owners)
        base_u, base_l = baseline[DEFAULT_EVERY], baseline[1]
        amortized = ((DEFAULT_EVERY - 1) * unlogged + logged) / DEFAULT_EVERY
        rows.append(
            [
                label,
                f"{base_u * 1e3:,.0f}",
                f"{unlogged * 1e3:.2f}",
                f"{logged * 1e3:,.0f} ({log_time * 1e3:.0f})",
                f"{1 + unlogged / base_u:.4f}x",
                f"{1 + logged / base_l:.3f}x",
                f"{1 + amortized / base_u:.4f}x",
            ]
        )
    for every in (DEFAULT_EVERY, 1):
        for owner in names:
            parts: defaultdict[str, list[float]] = defaultdict(list)
            calls: dict[str, int] = {}
            for s in runs[(every, True)][0]:
                for (o, part), seconds in s["parts"].items():
                    if o == owner:
                        parts[part].append(seconds)
                        calls[part] = s["calls"][(o, part)]
            for part, values in parts.items():
                detail.append([every, owner, part, calls[part], f"{statistics.median(values) * 1e3:.3f}"])
    print(f"\nAccounting: ResNet-18 width {width}, 3x32x32, batch 128; per configuration 1 warm-up + {steps} steps")
    print(f"Machine: {machine()}; run took {clock() - started:.0f} s")
    print(f"Hook dispatch (no-op forward hook on nn.Identity): {dispatch * 1e6:.2f} us per hooked module call\n")
    print(
        table(
            rows,
            [
                "monitors",
                "baseline step ms (median)",
                "ours per unlogged step ms (hooks + dispatch)",
                "ours per logged step ms (of which pl_module.log)",
                "ratio unlogged",
                "ratio logged",
                f"amortized at log_every_n_steps={DEFAULT_EVERY}",
            ],
        )
    )
    print("\nWhere the time goes (median per step):\n")
    print(table(detail, ["log_every_n_steps", "monitor", "part", "calls per step", "ms per step"]))
    print("\nCross-check (noisy: two different sets of steps): median step time with both monitors")
    for every in (DEFAULT_EVERY, 1):
        ours, _, step, _ = per_step(every, names)
        print(
            f"  log_every_n_steps={every}: {step * 1e3:,.0f} ms = baseline {baseline[every] * 1e3:,.0f} ms "
            f"+ ours {ours * 1e3:,.1f} ms + unexplained {(step - baseline[every] - ours) * 1e3:+,.0f} ms"
        )


# ---- interleaved mode
# -------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--account", action="store_true", help="time inside the monitors per step (precise)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per configuration")
    args = parse_with_device(parser)
    width = 16 if args.quick else 64
    if args.account:
        account(width, args.steps or (3 if args.quick else 5))
        return
    steps = args.steps or (8 if args.quick else 10)
    repeats = args.repeats or (2 if args.quick else 3)

    def model_fn():
        return ResNet18(width=width)

    def datamodule_fn():
        return SyntheticImageDataModule(num_examples=128 * 16, batch_size=128)

    unlogged = compare(CONFIGS, model_fn, datamodule_fn, steps=steps, repeats=repeats)
    logged = compare(CONFIGS, model_fn, datamodule_fn, steps=steps, repeats=repeats, log_every_n_steps=1)
    rows = []
    for name in CONFIGS:
        ratio_unlogged = unlogged[name] / unlogged["without"]
        ratio_logged = logged[name] / logged["without"]
        amortized = ((DEFAULT_EVERY - 1) * ratio_unlogged + ratio_logged) / DEFAULT_EVERY
        rows.append(
            [
                name,
                f"{unlogged[name] * 1e3:.0f}",
                f"{ratio_unlogged:.3f}x",
                f"{logged[name] * 1e3:.0f}",
                f"{ratio_logged:.3f}x",
                f"{amortized:.3f}x",
            ]
        )
    print(f"\nResNet-18 width {width}, 3x32x32, batch 128, {steps} steps x {repeats} repeats, interleaved")
    print(f"Machine: {machine()}\n")
    print(
        table(
            rows,
            [
                "monitors",
                "unlogged step ms",
                "ratio (unlogged)",
                "logged step ms",
                "ratio (logged)",
                f"amortized ratio at log_every_n_steps={DEFAULT_EVERY}",
            ],
        )
    )


if __name__ == "__main__":
    main()
