"""Command line: ``lightning-interp demo [--model cnn|transformer]`` and ``lightning-interp compare
RUNS_DIR``."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "main",
    "demo",
    "MODELS",
    "VARIANTS",
    "TRANSFORMER_VARIANTS",
    "TRANSFORMER_DIR",
    "TRANSFORMER_DEMO_SETTINGS",
]

MODELS = ("cnn", "transformer")

# run directory name -> DigitsCNN(norm=...)
VARIANTS: dict[str, str] = {"batchnorm": "batch", "layernorm": "layer", "groupnorm": "group", "none": "none"}
_ALIASES = {"batch": "batchnorm", "bn": "batchnorm", "layer": "layernorm", "ln": "layernorm", "group": "groupnorm",
            "gn": "groupnorm", "nonorm": "none", "no": "none"}  # fmt: skip
DEFAULT_VARIANTS = ("batchnorm", "layernorm", "none")

# run directory name -> DigitsTransformer(norm=...); the runs go to <out>/transformer/<variant>
TRANSFORMER_VARIANTS: dict[str, str] = {v: v for v in ("postln", "preln", "rmsnorm", "none")}
_TRANSFORMER_ALIASES = {"post": "postln", "post-ln": "postln", "pre": "preln", "pre-ln": "preln",
                        "rms": "rmsnorm", "pre-rmsnorm": "rmsnorm", "nonorm": "none",
                        "no": "none"}  # fmt: skip
DEFAULT_TRANSFORMER_VARIANTS = ("postln", "preln", "rmsnorm", "none")
TRANSFORMER_DIR = "transformer"

DEFAULT_EPOCHS = {"cnn": 10, "transformer": 8}
# the transformer demo's settings, the same for every variant: 12 blocks, the CNN demo's learning rate (3e-3),
# and no warm-up (the question of Xiong et al. 2020: which placements train without one)
TRANSFORMER_DEMO_SETTINGS: dict[str, int | float] = {"depth": 12, "lr": 3e-3}

# every callback the package offers, with the demo's settings; a callback not present in this version is skipped
_DEMO_CALLBACKS: tuple[tuple[str, dict], ...] = (
    ("LinearProbeMonitor", {}),
    ("NormStatsMonitor", {}),
    ("GradFlowMonitor", {}),
    ("SaliencyMonitor", {"every_n_epochs": 2}),
    ("RepresenterMonitor", {}),
)


def _variant(name: str, model: str = "cnn") -> str:
    if model == "transformer":
        variants, aliases = TRANSFORMER_VARIANTS, _TRANSFORMER_ALIASES
    else:
        variants, aliases = VARIANTS, _ALIASES
    key = aliases.get(name.strip().lower(), name.strip().lower())
    if key not in variants:
        raise argparse.ArgumentTypeError(
            f"unknown {model} variant {name!r}; choose from {', '.join(variants)}"
        )
    return key


def demo_callbacks() -> list:
    """One instance of every callback this version of the package has, configured for the demo."""
    module = importlib.import_module("lightning_interp.callbacks")
    return [getattr(module, name)(**kwargs) for name, kwargs in _DEMO_CALLBACKS if hasattr(module, name)]


def _model_settings(model: str, variant: str, warmup_steps: int) -> tuple[str, dict[str, object]]:
    """The model class's name and keyword arguments for one variant of the demo."""
    if model == "transformer":
        return "DigitsTransformer", {"norm": TRANSFORMER_VARIANTS[variant], **TRANSFORMER_DEMO_SETTINGS,
                                     "warmup_steps": warmup_steps}  # fmt: skip
    return "DigitsCNN", {"norm": VARIANTS[variant]}


def _train_variant(
    model: str, variant: str, epochs: int, root: str, seed: int, progress_bar: bool, warmup_steps: int,
    threads: int | None,
) -> tuple[dict[str, float], float | None, float]:  # fmt: skip
    """Train one variant with every callback attached, with ``threads`` intra-op threads (``None``: as they
    are); returns the final validation probe accuracy per layer, ``val_acc`` and the seconds it took."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_interp import models
    from lightning_interp.callbacks import LinearProbeMonitor
    from lightning_interp.data import DigitsDataModule

    start = time.perf_counter()
    previous = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        L.seed_everything(seed, verbose=False)
        callbacks = demo_callbacks()
        trainer = L.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            logger=TensorBoardLogger(save_dir=root, name=variant, version="", default_hp_metric=False),
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=progress_bar,
            enable_model_summary=False,
            log_every_n_steps=5,
        )
        name, kwargs = _model_settings(model, variant, warmup_steps)
        network = getattr(models, name)(**kwargs)  # built after seeding
        trainer.fit(network, datamodule=DigitsDataModule(seed=seed))
    finally:
        torch.set_num_threads(previous)
    probe = next(cb for cb in callbacks if isinstance(cb, LinearProbeMonitor))
    results = {layer: values[-1] for layer, values in probe.history["val"].items() if values}
    val_acc = trainer.callback_metrics.get("val_acc")
    return results, (float(val_acc) if val_acc is not None else None), time.perf_counter() - start


def demo(
    epochs: int | None = None,
    out: str | Path = "runs",
    variants: Sequence[str] | None = None,
    seed: int = 0,
    progress_bar: bool = True,
    model: str = "cnn",
    warmup_steps: int = 0,
) -> dict[str, dict[str, float]]:
    """Train a digits model once per normalization variant with every callback attached; returns the final
    validation probe accuracy per variant and layer.

    ``model="cnn"`` (default): ``DigitsCNN`` with BatchNorm / LayerNorm / GroupNorm / none, each a
    ``TensorBoardLogger`` run in ``out/<variant>``. ``model="transformer"``: ``DigitsTransformer`` (8 row
    tokens) with Post-LN / Pre-LN / Pre-RMSNorm / none and :data:`TRANSFORMER_DEMO_SETTINGS` (12 blocks,
    learning rate 3e-3) plus ``warmup_steps`` (0: none), each in ``out/transformer/<variant>``, trained with
    one intra-op thread (a second thread makes its 64-wide steps 1.3x faster on an idle 2-core machine, but
    30x slower when another process keeps a core busy; the thread count is restored afterwards).
    ``epochs=None`` takes the model's default (:data:`DEFAULT_EPOCHS`), ``variants=None`` its default
    variants. Training takes seconds per variant and epoch, too slow for a docstring; ``demo(epochs=1,
    out=tmp, variants=["none"])`` returns e.g. ``{"none": {"input": 0.89, "net.relu1": 0.86, ...,
    "net.relu4": 0.11}}``. What it attaches and trains:

    Example:
        >>> [type(callback).__name__ for callback in demo_callbacks()]  # attached to every variant's run
        ['LinearProbeMonitor', 'NormStatsMonitor', 'GradFlowMonitor', 'SaliencyMonitor', 'RepresenterMonitor']
        >>> {variant: VARIANTS[variant] for variant in DEFAULT_VARIANTS}  # run folder -> DigitsCNN(norm=...)
        {'batchnorm': 'batch', 'layernorm': 'layer', 'none': 'none'}
        >>> list(DEFAULT_TRANSFORMER_VARIANTS)  # folder transformer/<variant> -> DigitsTransformer(norm=...)
        ['postln', 'preln', 'rmsnorm', 'none']
    """
    if model not in MODELS:
        raise ValueError(f"Expected argument `model` to be one of {list(MODELS)}, but got {model!r}.")
    transformer = model == "transformer"
    epochs = DEFAULT_EPOCHS[model] if epochs is None else epochs
    if variants is None:
        variants = DEFAULT_TRANSFORMER_VARIANTS if transformer else DEFAULT_VARIANTS
    variants = [_variant(v, model) for v in variants]
    root = Path(out) / TRANSFORMER_DIR if transformer else Path(out)
    threads = 1 if transformer else None

    results: dict[str, dict[str, float]] = {}
    for variant in variants:
        name, kwargs = _model_settings(model, variant, warmup_steps)
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        print(f"\n== {variant}: {name}({shown}), {epochs} epochs -> {root / variant}")
        results[variant], val_acc, seconds = _train_variant(
            model, variant, epochs, str(root), seed, progress_bar, warmup_steps, threads
        )
        print(f"   done in {seconds:.1f} s, val_acc {val_acc:.3f}" if val_acc is not None else "")
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


def _compare(runs_dir: str | Path, exclude: Sequence[str] = ()) -> str | None:
    try:
        compare = importlib.import_module("lightning_interp.compare")
    except ImportError:
        return None
    return compare.compare_command(runs_dir, exclude=exclude)


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
        ...     main(["demo", "--model", "transformer", "--variants", "batchnorm"])  # a CNN variant
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
    p_demo = sub.add_parser(
        "demo",
        help="train the digits CNN (BatchNorm, LayerNorm, none) or, with --model transformer, the digits "
        "transformer (Post-LN, Pre-LN, Pre-RMSNorm, none) with every callback attached",
    )
    p_demo.add_argument(
        "--model", choices=MODELS, default="cnn", help="which digits model to train (default cnn)"
    )
    p_demo.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"epochs per variant (default {DEFAULT_EPOCHS['cnn']} for the CNN, "
        f"{DEFAULT_EPOCHS['transformer']} for the transformer)",
    )
    p_demo.add_argument(
        "--out",
        default="runs",
        help=f"TensorBoard log directory (default runs/); the transformer's runs go to "
        f"OUT/{TRANSFORMER_DIR}/",
    )
    p_demo.add_argument(
        "--variants",
        type=lambda s: [v.strip() for v in s.split(",") if v.strip()],
        default=None,
        help=f"comma-separated subset of {','.join(VARIANTS)} for the CNN (default "
        f"{','.join(DEFAULT_VARIANTS)}), of {','.join(TRANSFORMER_VARIANTS)} for the transformer "
        "(default all four)",
    )
    p_demo.add_argument(
        "--warmup-steps",
        type=int,
        default=0,
        help="transformer only: linear learning-rate warm-up over this many optimizer steps "
        "(default 0: none)",
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

    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    try:
        variants = [_variant(v, args.model) for v in args.variants] if args.variants is not None else None
    except argparse.ArgumentTypeError as err:
        parser.error(f"argument --variants: {err}")
    if variants == []:
        parser.error("argument --variants: name at least one variant")
    if args.warmup_steps < 0 or (args.warmup_steps and args.model != "transformer"):
        parser.error("--warmup-steps must be >= 0 and is for --model transformer only")
    start = time.perf_counter()
    results = demo(args.epochs, args.out, variants, args.seed, not args.no_progress_bar, model=args.model,
                   warmup_steps=args.warmup_steps)  # fmt: skip
    print("\nFinal validation accuracy of a linear probe on each layer:\n")
    print(probe_table(results))
    if args.model == "transformer":
        logdir = Path(args.out) / TRANSFORMER_DIR
        report = _compare(logdir)
    else:  # the transformer demo's runs under OUT/transformer/ are not part of the CNN comparison
        logdir = Path(args.out)
        report = _compare(logdir, exclude=(TRANSFORMER_DIR,))
    if report:
        print("\n" + report)
    print(f"\nAll variants done in {time.perf_counter() - start:.0f} s. Look at them with:\n")
    print(f"    tensorboard --logdir {logdir} --samples_per_plugin images=200\n")
    return 0

if __name__ == "__main__":
    sys.exit(main())
