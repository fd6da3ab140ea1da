"""How true the probe curves are: LinearProbeMonitor's validation reading at every epoch against an offline
scikit-learn LogisticRegression fitted on that epoch's frozen activations (the same independent reference and models
as tests/test_probe_truth.py), one row per model.

    python benchmarks/bench_probe_quality.py            # 10 epochs per model
    python benchmarks/bench_probe_quality.py --quick    # 6 epochs (what the test runs)
    python benchmarks/bench_probe_quality.py --tol 1e-6 # a stricter stopping rule than the default 1e-4
    python benchmarks/bench_probe_quality.py --fit online   # the online (Adam, one step per batch) probes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine, parse_with_device, table, trainer_options  # noqa: E402

from tests.test_probe_truth import MODELS, fit_with_reference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--tol", type=float, default=None, help="the monitor's `tol` (default: its own, 1e-4)")
    parser.add_argument("--fit", choices=("frozen", "online"), default="frozen")
    args = parse_with_device(parser)
    epochs = args.epochs or (6 if args.quick else 10)
    options = {"fit": args.fit, **({} if args.tol is None else {"tol": args.tol})}
    rows = []
    for name, model_fn in MODELS.items():
        iterations: list[int] = []
        monitor, reference = fit_with_reference(model_fn, epochs, on_fit=iterations.extend, trainer_options=trainer_options(),
                                                **options)
        gaps = [
            [abs(monitor.history["val"][layer][e] - offline[layer]) for layer in offline]
            for e, offline in enumerate(reference.scores)
        ]
        worst_from_third = max(max(g) for g in gaps[2:])
        final = reference.scores[-1]
        deepest = [layer for layer in monitor.history["val"]][-1]
        rows.append([
            name, len(final), f"{100 * max(gaps[-1]):.1f}", f"{100 * worst_from_third:.1f}",
            f"{100 * sum(map(sum, gaps[2:])) / sum(map(len, gaps[2:])):.2f}",
            f"{monitor.history['val'][deepest][-1]:.3f} / {final[deepest]:.3f}",
            f"{sum(iterations) / len(iterations):.0f}" if iterations else "-",
        ])  # fmt: skip
    print(f"\nMachine: {machine()}; {epochs} epochs per model; fit={args.fit!r}, tol {args.tol or 'default (1e-4)'}\n")
    print(table(rows, ["model", "layers", "final: worst gap (points)", "epochs 3+: worst gap (points)",
                       "epochs 3+: mean gap (points)", "deepest layer, final: monitor / offline",
                       "L-BFGS iterations per layer fit (mean)"]))  # fmt: skip


if __name__ == "__main__":
    main()
