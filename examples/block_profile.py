"""Per-block profile of runs logged by the suite: for each run under RUNS_DIR, one row per probed layer with the
gradient norm at the layer's output, the activation spread, the effective gain g/sigma of the normalization layers
inside it, at the first and the last logged step, and the final probe accuracy. Reads the TensorBoard event files
with TensorBoard's own EventAccumulator; prints markdown.

    python examples/block_profile.py runs/transformer          # after `lightning-interp demo --model transformer`
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator


def _series(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    try:
        return [(e.step, e.value) for e in events.Scalars(tag)]
    except KeyError:
        return []


def _ends(events: EventAccumulator, tag: str) -> tuple[float, float]:
    values = _series(events, tag)
    return (values[0][1], values[-1][1]) if values else (math.nan, math.nan)


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "—"
    return f"{x:.2g}" if abs(x) < 0.01 or abs(x) >= 100 else f"{x:.3g}"


def profile(run: Path) -> str:
    events = EventAccumulator(str(run), size_guidance={SCALARS: 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    layers = [t[len("probe/val_acc/") :] for t in tags if t.startswith("probe/val_acc/")]
    norms = [t[len("norm/") : -len("/effective_gain")] for t in tags
             if t.startswith("norm/") and t.endswith("/effective_gain") and "/total/" not in t]  # fmt: skip
    steps = _series(events, "gradflow/total/cum_product")
    lines = [
        f"**{run.name}**: logged steps {steps[0][0] if steps else '?'} to {steps[-1][0] if steps else '?'}; "
        f"gradflow/total/cum_product first {_fmt(steps[0][1]) if steps else '—'}, last "
        f"{_fmt(steps[-1][1]) if steps else '—'}, lowest {_fmt(min(v for _, v in steps)) if steps else '—'}; "
        f"flow events {_fmt(_ends(events, 'gradflow/total/flow_events')[1])}",
        "",
        "| layer | grad_norm first | grad_norm last | act_std first | act_std last | g/σ of its norms first | "
        "g/σ last | probe val acc (final) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layer in layers:
        grad, spread = _ends(events, f"gradflow/{layer}/grad_norm"), _ends(events, f"norm/{layer}/act_std")
        inside = [_ends(events, f"norm/{n}/effective_gain") for n in norms if n.startswith(layer + ".")]
        gain = tuple(sum(g[i] for g in inside) / len(inside) if inside else math.nan for i in (0, 1))
        accuracy = _series(events, f"probe/val_acc/{layer}")
        lines.append(f"| {layer} | {_fmt(grad[0])} | {_fmt(grad[1])} | {_fmt(spread[0])} | {_fmt(spread[1])} | "
                     f"{_fmt(gain[0])} | {_fmt(gain[1])} | {_fmt(accuracy[-1][1]) if accuracy else '—'} |")  # fmt: skip
    outside = [n for n in norms if not any(n.startswith(layer + ".") for layer in layers)]
    for n in outside:
        first, last = _ends(events, f"norm/{n}/effective_gain")
        lines.append(f"| {n} (norm after the blocks) | | | | | {_fmt(first)} | {_fmt(last)} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", nargs="?", default="runs/transformer")
    args = parser.parse_args()
    runs = sorted(p for p in Path(args.runs_dir).iterdir() if p.is_dir() and any(p.glob("events.out.tfevents.*")))
    print("\n\n".join(profile(run) for run in runs))


if __name__ == "__main__":
    main()
