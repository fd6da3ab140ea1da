"""NormStatsMonitor / GradFlowMonitor overhead on the ResNet-18 synthetic benchmark (3x32x32, batch 128):
step-time ratio with/without each monitor and with both, side by side in one run (interleaved repeats).

    python benchmarks/bench_normgrad.py            # ResNet-18 at width 64
    python benchmarks/bench_normgrad.py --quick    # width 16, fewer steps

Both monitors work only on steps whose metrics Lightning writes (``log_every_n_steps``, default 50); the other
steps pay a flag check. So two numbers per configuration: the median step time at the default frequency (an
unlogged step), and the median step time with ``log_every_n_steps=1`` (every step logged), each as a ratio to
the baseline of the same interleaved comparison. The amortized ratio at the default frequency is ``(49 *
unlogged ratio + logged ratio) / 50``. No logger is attached, so the per-epoch TensorBoard histograms and
figure are not timed (they happen once an epoch, outside the step).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import compare, machine, table  # noqa: E402

from lightning_interp.callbacks import GradFlowMonitor, NormStatsMonitor  # noqa: E402
from lightning_interp.data import SyntheticImageDataModule  # noqa: E402
from lightning_interp.models import ResNet18  # noqa: E402

CONFIGS = {
    "without": lambda: [],
    "NormStatsMonitor": lambda: [NormStatsMonitor()],
    "GradFlowMonitor": lambda: [GradFlowMonitor()],
    "both": lambda: [NormStatsMonitor(), GradFlowMonitor()],
}
DEFAULT_EVERY = 50


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    width = 16 if args.quick else 64
    steps = 8 if args.quick else 10
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
