"""``lightning-interp compare RUNS_DIR``: read the TensorBoard event files of several runs and put them side
by side.

Every folder under ``RUNS_DIR`` that holds ``events.out.tfevents.*`` files is a run; its name is its path
relative to ``RUNS_DIR`` without Lightning's ``lightning_logs`` / ``version_N`` parts (the newest folder wins
when two map to the same name). Read with TensorBoard's own ``EventAccumulator``; the tags are those the
package's models and callbacks write: ``val_acc`` (and ``epoch``), ``probe/val_acc/<layer>``
(LinearProbeMonitor), ``gradflow/total/cum_product`` (GradFlowMonitor), ``norm/total/effective_gain``,
``norm/total/dead_frac`` and ``norm/total/saturated_frac`` (NormStatsMonitor). A run without some tag shows
"—" there (a transformer without BatchNorm or ReLU modules has no dead or saturated fraction; one without
normalization no effective gain). Probe layers are put in the model's order as the text ``probe/layers`` lists
them (``net.embed`` before ``net.blocks.0``), in natural order of their names when that text is absent.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import warnings
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_interp.errors import LightningInterpError

__all__ = [
    "RunSummary",
    "find_runs",
    "read_run",
    "compare_runs",
    "summary_table",
    "write_figure",
    "compare_command",
]

TARGET_ACCURACY = 0.9
_VERSION = re.compile(r"^(lightning_logs|version_\d+)$")
# a row of the table LinearProbeMonitor writes as the text probe/layers: | 0 | `input` | model input |
_LAYER_ROW = re.compile(r"^\| \d+ \| `([^`]+)` \|", re.MULTILINE)


@dataclass
class RunSummary:
    """What ``compare`` reports about one run (``nan`` / ``None`` where the run lacks the tag).

    Example:
        >>> run = RunSummary("mlp/none", final_val_acc=0.42, val_acc_curve=[(1, 0.3), (2, 0.42)])
        >>> run.epochs_to_target is None, math.isnan(run.dead_frac), run.probe_acc
        (True, True, {})
        >>> print(summary_table([run]).splitlines()[-1])  # logged but never reached 90%; other tags absent
        | mlp/none | 0.420 | never | — | — | — | — | — |
    """

    name: str
    final_val_acc: float = float("nan")
    epochs_to_target: int | None = None
    probe_acc: dict[str, float] = field(default_factory=dict)
    median_cum_product: float = float("nan")
    mean_effective_gain: float = float("nan")
    dead_frac: float = float("nan")
    saturated_frac: float = float("nan")
    val_acc_curve: list[tuple[int, float]] = field(default_factory=list)
    cum_product_curve: list[tuple[int, float]] = field(default_factory=list)


def _natural_key(name: str) -> list[object]:
    if name == "input":
        return [""]
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(name == prefix or name.startswith(prefix.rstrip("/") + "/") for prefix in exclude)


def _layer_key(name: str, order: list[str]) -> tuple[int, list[object]]:
    """Position in the logged layer order (a shared module's ``name@1`` after ``name``), else natural
    order."""
    base, _, call = name.partition("@")
    if base in order:
        return (order.index(base), [call])
    return (len(order), _natural_key(name))


def _probe_layer_order(accumulator: Any) -> list[str]:
    """The layers, in the model's order, of the last ``probe/layers`` text LinearProbeMonitor wrote; ``[]``
    when there is none."""
    tag = "probe/layers/text_summary"
    if tag not in accumulator.Tags().get("tensors", []):
        return []
    from tensorboard.util import tensor_util

    events = accumulator.Tensors(tag)
    if not events:
        return []
    values = tensor_util.make_ndarray(events[-1].tensor_proto).reshape(-1)
    text = "\n".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values)
    return _LAYER_ROW.findall(text)


def find_runs(runs_dir: str | os.PathLike[str], exclude: Sequence[str] = ()) -> dict[str, Path]:
    """``{run name: folder}`` for every folder under ``runs_dir`` holding TensorBoard event files, except the
    runs named in ``exclude`` and those under a folder named there (``"transformer"`` drops
    ``transformer/preln``).

    Example:
        >>> import tempfile
        >>> find_runs(tempfile.mkdtemp())
        {}
    """
    root = Path(runs_dir)
    found: dict[str, Path] = {}
    for folder, _, files in sorted(os.walk(root)):
        if not any(f.startswith("events.out.tfevents") for f in files):
            continue
        parts = [p for p in Path(folder).relative_to(root).parts if not _VERSION.match(p)]
        name = "/".join(parts) or root.name
        if _excluded(name, exclude):
            continue
        previous = found.get(name)
        if previous is None or Path(folder).stat().st_mtime > previous.stat().st_mtime:
            found[name] = Path(folder)
    return dict(sorted(found.items()))


def read_run(name: str, folder: str | os.PathLike[str]) -> RunSummary:
    """Summarise one run's event files (see the module docstring for the tags read).

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> logged = [(0, 10, 0.5, 0.5), (1, 20, 0.92, 2.0), (2, 30, 0.95, 1.0)]  # epoch, step, acc, product
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     with SummaryWriter(folder) as writer:
        ...         for epoch, step, acc, product in logged:
        ...             writer.add_scalar("val_acc", acc, step)
        ...             writer.add_scalar("epoch", epoch, step)
        ...             writer.add_scalar("gradflow/total/cum_product", product, step)
        ...         writer.add_scalar("probe/val_acc/relu1", 0.9, 30)
        ...         writer.add_scalar("probe/val_acc/input", 0.8, 30)
        ...     run = read_run("demo", folder)
        >>> [(epochs, round(acc, 2)) for epochs, acc in run.val_acc_curve]  # (epochs done, val_acc)
        [(1, 0.5), (2, 0.92), (3, 0.95)]
        >>> run.epochs_to_target, run.median_cum_product
        (2, 1.0)
        >>> {layer: round(acc, 2) for layer, acc in run.probe_acc.items()}  # input first
        {'input': 0.8, 'relu1': 0.9}
        >>> math.isnan(run.dead_frac)  # no norm/total/dead_frac in this run
        True
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    accumulator.Reload()
    tags = set(accumulator.Tags().get("scalars", []))
    layer_order = _probe_layer_order(accumulator)

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, float(e.value)) for e in accumulator.Scalars(tag)] if tag in tags else []

    summary = RunSummary(name)
    val = series("val_acc")
    if val:
        epoch_at = {step: value for step, value in series("epoch")}
        curve = []
        for i, (step, value) in enumerate(val):
            epochs_done = int(epoch_at[step]) + 1 if step in epoch_at else i + 1
            curve.append((epochs_done, value))
        summary.val_acc_curve = curve
        summary.final_val_acc = curve[-1][1]
        summary.epochs_to_target = next((e for e, v in curve if v >= TARGET_ACCURACY), None)
    for tag in tags:
        if tag.startswith("probe/val_acc/"):
            summary.probe_acc[tag[len("probe/val_acc/") :]] = series(tag)[-1][1]
    summary.probe_acc = dict(sorted(summary.probe_acc.items(), key=lambda kv: _layer_key(kv[0], layer_order)))
    products = series("gradflow/total/cum_product")
    summary.cum_product_curve = products
    finite = [v for _, v in products if math.isfinite(v)]
    if finite:
        summary.median_cum_product = statistics.median(finite)
    gains = [v for _, v in series("norm/total/effective_gain") if math.isfinite(v)]
    if gains:
        summary.mean_effective_gain = statistics.fmean(gains)
    for stat in ("dead_frac", "saturated_frac"):
        values = series(f"norm/total/{stat}")
        if values:
            setattr(summary, stat, values[-1][1])
    return summary


def compare_runs(runs_dir: str | os.PathLike[str], exclude: Sequence[str] = ()) -> list[RunSummary]:
    """Read every run under ``runs_dir`` (but those ``exclude`` names, see :func:`find_runs`).

    Raises:
        LightningInterpError: ``runs_dir`` does not exist or holds no event files.

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> with tempfile.TemporaryDirectory() as root:
        ...     for folder, acc in [("batchnorm/version_0", 0.95), ("none/lightning_logs/version_3", 0.7)]:
        ...         with SummaryWriter(os.path.join(root, folder)) as writer:
        ...             writer.add_scalar("val_acc", acc, 0)
        ...     runs = compare_runs(root)
        >>> [(run.name, round(run.final_val_acc, 2)) for run in runs]  # names without the version parts
        [('batchnorm', 0.95), ('none', 0.7)]
        >>> with tempfile.TemporaryDirectory() as empty:
        ...     compare_runs(empty)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        lightning_interp.errors.LightningInterpError: Expected argument `runs_dir` to hold runs ...
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise LightningInterpError(
            f"Expected argument `runs_dir` to be a folder of TensorBoard runs, but {str(root)!r} "
            "is not a folder."
        )
    runs = find_runs(root, exclude)
    if not runs:
        raise LightningInterpError(
            f"Expected argument `runs_dir` to hold runs (sub-folders with events.out.tfevents.* files), but "
            f"{str(root)!r} has none. Train with a TensorBoardLogger(save_dir=RUNS_DIR, name=<variant>)."
        )
    return [read_run(name, folder) for name, folder in runs.items()]


def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def summary_table(runs: list[RunSummary]) -> str:
    """The side-by-side markdown table.

    Example:
        >>> run = RunSummary("mlp/batch", final_val_acc=0.95, epochs_to_target=3,
        ...                  probe_acc={"input": 0.9, "act0": 0.93}, median_cum_product=1.2)
        >>> table = summary_table([run])
        >>> print(table.splitlines()[0][:39])
        | run | final val acc | epochs to 90% |
        >>> print(table.splitlines()[2])
        | mlp/batch | 0.950 | 3 | 0.90 / 0.93 | 1.2 | — | — | — |
    """
    header = [
        "run",
        "final val acc",
        f"epochs to {TARGET_ACCURACY:.0%}",
        "probe val acc (input → output)",
        "median grad product (in↔out)",
        "mean eff. gain",
        "dead frac",
        "saturated frac",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        probes = " / ".join(f"{v:.2f}" for v in run.probe_acc.values()) or "—"
        epochs = (
            str(run.epochs_to_target)
            if run.epochs_to_target is not None
            else ("never" if run.val_acc_curve else "—")
        )
        cells = [
            run.name,
            _fmt(run.final_val_acc, ".3f"),
            epochs,
            probes,
            _fmt(run.median_cum_product, ".2g"),
            _fmt(run.mean_effective_gain, ".3g"),
            _fmt(run.dead_frac, ".3f"),
            _fmt(run.saturated_frac, ".3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_figure(runs: list[RunSummary], path: str | os.PathLike[str]) -> bool:
    """Validation accuracy per epoch, the cumulative gradient product per step (log scale) and the final probe
    accuracy per layer, one line per run, as a PNG. Returns ``False`` (with a warning) without matplotlib.

    Example:
        >>> import tempfile
        >>> run = RunSummary("a", val_acc_curve=[(1, 0.5), (2, 0.9)], probe_acc={"input": 0.8, "relu1": 0.9},
        ...                  cum_product_curve=[(10, 0.5), (20, 2.0)])
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     wrote = write_figure([run], os.path.join(folder, "compare.png"))
        ...     png = Path(folder, "compare.png").read_bytes()
        >>> wrote, png[1:4]  # the PNG signature
        (True, b'PNG')
        >>> int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # width, height in pixels
        (1500, 450)
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn(
            "lightning-interp compare: matplotlib is not installed; no figure written.", stacklevel=2
        )
        return False
    fig = Figure(figsize=(15, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    acc_ax, flow_ax, probe_ax = fig.subplots(1, 3)
    for run in runs:
        if run.val_acc_curve:
            acc_ax.plot(*zip(*run.val_acc_curve), marker=".", label=run.name)
        positive = [(s, v) for s, v in run.cum_product_curve if v > 0 and math.isfinite(v)]
        if positive:
            flow_ax.plot(*zip(*positive), label=run.name)
        if run.probe_acc:
            probe_ax.plot(range(len(run.probe_acc)), list(run.probe_acc.values()), marker="o", label=run.name)
    acc_ax.set(title="validation accuracy", xlabel="epoch", ylabel="val_acc")
    acc_ax.axhline(TARGET_ACCURACY, color="grey", lw=0.8, ls=":")
    flow_ax.set(title="gradient product output → first layer", xlabel="step", yscale="log")
    flow_ax.axhline(1.0, color="grey", lw=0.8)
    probe_ax.set(title="final probe accuracy by depth", xlabel="layer index (0 = input)", ylabel="val acc")
    for ax in (acc_ax, flow_ax, probe_ax):
        if ax.get_legend_handles_labels()[0]:  # reference lines alone carry no label
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path))
    return True


def compare_command(runs_dir: str | os.PathLike[str], exclude: Sequence[str] = ()) -> str:
    """What ``lightning-interp compare RUNS_DIR`` does: read the runs (but those ``exclude`` names, see
    :func:`find_runs`), write ``RUNS_DIR/compare.md`` and ``RUNS_DIR/compare.png``, and return the table (with
    the paths written) as text to print.

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> with tempfile.TemporaryDirectory() as root:
        ...     with SummaryWriter(os.path.join(root, "batchnorm")) as writer:
        ...         for step, acc in [(10, 0.8), (20, 0.95)]:
        ...             writer.add_scalar("val_acc", acc, step)
        ...             writer.add_scalar("gradflow/total/cum_product", 0.5, step)
        ...     report = compare_command(root)
        ...     written = sorted(path.name for path in Path(root).iterdir() if path.is_file())
        >>> print(report)  # doctest: +ELLIPSIS
        | run | final val acc | epochs to 90% | ...
        |---|---|---|---|---|---|---|---|
        | batchnorm | 0.950 | 2 | — | 0.5 | — | — | — |
        <BLANKLINE>
        markdown: .../compare.md
        figure:   .../compare.png
        >>> written
        ['compare.md', 'compare.png']
    """
    root = Path(runs_dir)
    runs = compare_runs(root, exclude)
    table = summary_table(runs)
    markdown = root / "compare.md"
    figure = root / "compare.png"
    notes = (
        f"Runs under `{root}`. *epochs to {TARGET_ACCURACY:.0%}*: first epoch whose `val_acc` reached it. "
        "*probe val acc*: final `probe/val_acc/<layer>`, input first. *median grad product*: median over "
        "logged steps of `gradflow/total/cum_product` (gradient norm at the first watched layer / at the "
        "output; 1 = preserved, << 1 vanishing, >> 1 exploding). *mean eff. gain*: mean over steps of "
        "`norm/total/effective_gain` "
        "(mean |gamma|/sigma of the normalization layers). *dead / saturated frac*: final `norm/total/*`.\n"
    )
    markdown.write_text(f"# Comparison of {len(runs)} runs\n\n{table}\n\n{notes}", encoding="utf-8")
    wrote = write_figure(runs, figure)
    lines = [table, "", f"markdown: {markdown}"]
    if wrote:
        lines.append(f"figure:   {figure}")
    return "\n".join(lines)
