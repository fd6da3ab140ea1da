"""Command line: ``lightning-interp demo`` and ``lightning-interp compare RUNS_DIR``."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "demo", "VARIANTS"]

# run directory name -> DigitsCNN(norm=...)
VARIANTS: dict[str, str] = {"batchnorm": "batch", "layernorm": "layer", "groupnorm": "group", "none": "none"}
_ALIASES = {"batch": "batchnorm", "bn": "batchnorm", "layer": "layernorm", "ln": "layernorm", "group": "groupnorm",
            "gn": "groupnorm", "nonorm": "none", "no": "none"}  # fmt: skip
DEFAULT_VARIANTS = ("batchnorm", "layernorm", "none")

# every callback the package offers, with the demo's settings; a callback not present in this version is skipped
_DEMO_CALLBACKS: tuple[tuple[str, dict], ...] = (
    ("LinearProbeMonitor", {}),
    ("NormStatsMonitor", {}),
    ("GradFlowMonitor", {}),
    ("SaliencyMonitor", {"every_n_epochs": 2}),
    ("RepresenterMonitor", {}),
)


def _variant(name: str) -> str:
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in VARIANTS:
        raise argparse.ArgumentTypeError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    return key


def demo_callbacks() -> list:
    """One instance of every callback this version of the package has, configured for the demo."""
    module = importlib.import_module("lightning_interp.callbacks")
    return [getattr(module, name)(**kwargs) for name, kwargs in _DEMO_CALLBACKS if hasattr(module, name)]


def demo(epochs: int = 10, out: str | Path = "runs", variants: Sequence[str] = DEFAULT_VARIANTS, seed: int = 0,
         progress_bar: bool = True) -> dict[str, dict[str, float]]:  # fmt: skip
    """Train the digits CNN once per normalization variant with every callback attached; returns the final
    validation probe accuracy per variant and layer.

    Each variant is a ``TensorBoardLogger`` run in ``out/<variant>``. Training takes seconds per variant and
    epoch, too slow for a docstring; ``demo(epochs=1, out=tmp, variants=["none"])`` returns e.g.
    ``{"none": {"input": 0.89, "net.relu1": 0.86, ..., "net.relu4": 0.11}}``. What it attaches and trains:

    Example:
        >>> [type(callback).__name__ for callback in demo_callbacks()]  # attached to every variant's run
        ['LinearProbeMonitor', 'NormStatsMonitor', 'GradFlowMonitor', 'SaliencyMonitor', 'RepresenterMonitor']
        >>> {variant: VARIANTS[variant] for variant in DEFAULT_VARIANTS}  # run folder -> DigitsCNN(norm=...)
        {'batchnorm': 'batch', 'layernorm': 'layer', 'none': 'none'}
    """
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_interp.callbacks import LinearProbeMonitor
    from lightning_interp.data import DigitsDataModule
    from lightning_interp.models import DigitsCNN

    out = Path(out)
    results: dict[str, dict[str, float]] = {}
    for variant in variants:
        start = time.perf_counter()
        print(f"\n== {variant}: DigitsCNN(norm={VARIANTS[variant]!r}), {epochs} epochs -> {out / variant}")
        L.seed_everything(seed, verbose=False)
        callbacks = demo_callbacks()
        trainer = L.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            logger=TensorBoardLogger(save_dir=str(out), name=variant, version="", default_hp_metric=False),
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=progress_bar,
            enable_model_summary=False,
            log_every_n_steps=5,
        )
        trainer.fit(DigitsCNN(norm=VARIANTS[variant]), datamodule=DigitsDataModule(seed=seed))
        probe = next(cb for cb in callbacks if isinstance(cb, LinearProbeMonitor))
        results[variant] = {layer: values[-1] for layer, values in probe.history["val"].items() if values}
        val_acc = trainer.callback_metrics.get("val_acc")
        print(f"   done in {time.perf_counter() - start:.1f} s, val_acc {float(val_acc):.3f}" if val_acc is not None else "")
    return results


def probe_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per layer, one column per variant (final validation probe accuracy)."""
    layers: list[str] = []
    for per_layer in results.values():
        layers += [layer for layer in per_layer if layer not in layers]
    lines = ["| layer | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for layer in layers:
        cells = [f"{results[v][layer]:.3f}" if layer in results[v] else "-" for v in results]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _compare(runs_dir: str) -> str | None:
    try:
        compare = importlib.import_module("lightning_interp.compare")
    except ImportError:
        return None
    return compare.compare_command(runs_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``lightning-interp`` command: ``demo`` or ``compare RUNS_DIR`` (``argv`` defaults to the command
    line). Returns the exit status; argparse itself exits on ``--help`` and on bad arguments.

    Example:
        >>> import os, tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> with tempfile.TemporaryDirectory() as root:
        ...     with SummaryWriter(os.path.join(root, "none")) as writer:
        ...         writer.add_scalar("val_acc", 0.8, 10)
        ...         writer.add_scalar("gradflow/total/cum_product", 0.01, 10)
        ...     status = main(["compare", root])  # doctest: +ELLIPSIS
        | run | final val acc | epochs to 90% | ...
        |---|---|---|---|---|---|---|---|
        | none | 0.800 | never | — | 0.01 | — | — | — |
        <BLANKLINE>
        markdown: .../compare.md
        figure:   .../compare.png
        >>> status
        0
        >>> try:
        ...     main(["demo", "--epochs", "0"])  # rejected before anything trains
        ... except SystemExit as exit:
        ...     print("exit status", exit.code)
        exit status 2
        >>> try:  # doctest: +ELLIPSIS
        ...     main(["--help"])
        ... except SystemExit as exit:
        ...     print("exit status", exit.code)
        usage: lightning-interp [-h] {demo,compare} ...
        ...
        exit status 0
    """
    parser = argparse.ArgumentParser(prog="lightning-interp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="train the digits CNN with BatchNorm, LayerNorm and no normalization")
    p_demo.add_argument("--epochs", type=int, default=10, help="epochs per variant (default 10)")
    p_demo.add_argument("--out", default="runs", help="TensorBoard log directory (default runs/)")
    p_demo.add_argument(
        "--variants",
        type=lambda s: [_variant(v) for v in s.split(",") if v.strip()],
        default=list(DEFAULT_VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)})",
    )
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--no-progress-bar", action="store_true")
    p_cmp = sub.add_parser("compare", help="side-by-side table of several runs' TensorBoard logs")
    p_cmp.add_argument("runs_dir", help="directory holding one sub-directory per run")
    args = parser.parse_args(argv)

    if args.command == "compare":
        report = _compare(args.runs_dir)
        if report is None:
            print("compare is not available in this version", file=sys.stderr)
            return 1
        print(report)
        return 0

    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    start = time.perf_counter()
    results = demo(args.epochs, args.out, args.variants, args.seed, not args.no_progress_bar)
    print("\nFinal validation accuracy of a linear probe on each layer:\n")
    print(probe_table(results))
    report = _compare(args.out)
    if report:
        print("\n" + report)
    print(f"\nAll variants done in {time.perf_counter() - start:.0f} s. Look at them with:\n")
    print(f"    tensorboard --logdir {args.out} --samples_per_plugin images=200\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
