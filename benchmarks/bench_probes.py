"""LinearProbeMonitor overhead: step-time ratio with/without the monitor, side by side in one run, and the
peak-memory ratio (each configuration in its own child process).

    python benchmarks/bench_probes.py            # digits CNN + ResNet-18 (width 64) on 3x32x32, batch 128
    python benchmarks/bench_probes.py --quick    # ResNet-18 at width 16, fewer steps
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import compare, machine, run_steps, table  # noqa: E402

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


CONFIGS = {"without": lambda: [], "with LinearProbeMonitor": lambda: [LinearProbeMonitor()]}


def child(setup_name: str, config: str, quick: bool) -> None:
    model_fn, dm_fn, steps = setups(quick)[setup_name]
    run_steps(model_fn, dm_fn, CONFIGS[config], steps)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_memory(setup_name: str, config: str, quick: bool) -> float:
    args = [sys.executable, __file__, "--child", setup_name, config] + (["--quick"] if quick else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.quick)
        return
    rows = []
    for name, (model_fn, dm_fn, steps) in setups(args.quick).items():
        medians = compare(CONFIGS, model_fn, dm_fn, steps=steps, repeats=args.repeats)
        base, probed = medians["without"], medians["with LinearProbeMonitor"]
        mem = {c: peak_memory(name, c, args.quick) for c in CONFIGS}
        rows.append([
            name, f"{base * 1e3:.1f}", f"{probed * 1e3:.1f}", f"{probed / base:.3f}x",
            f"{mem['without']:.0f}", f"{mem['with LinearProbeMonitor']:.0f}",
            f"{mem['with LinearProbeMonitor'] / mem['without']:.3f}x",
        ])  # fmt: skip
    print(f"\nMachine: {machine()}\n")
    print(table(rows, ["setup", "step ms without", "step ms with", "time ratio", "peak MB without",
                       "peak MB with", "memory ratio"]))  # fmt: skip


if __name__ == "__main__":
    main()
