"""SaliencyMonitor: saliency maps of a fixed set of validation examples, drawn into TensorBoard during ``fit``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from lightning import LightningModule, Trainer
from torch import nn
from torch.func import functional_call
from typing_extensions import override

from lightning_interp._validation import check_choice, check_choices, check_positive_float, check_positive_int
from lightning_interp.attribution._gradients import as_target, gradient_scope, input_gradients
from lightning_interp.attribution.gradients import guided_backprop, quadrature
from lightning_interp.batches import BatchAdapter
from lightning_interp.callbacks._base import PeriodicDumpCallback
from lightning_interp.errors import LightningInterpError
from lightning_interp.examples import example_source, select_examples
from lightning_interp.layers import NORMALIZATIONS
from lightning_interp.saliency_render import image_grid, input_kind, sequence_strip, tabular_chart
from lightning_interp.tensorboard import tensorboard_writer

__all__ = ["SaliencyMonitor"]

Method = Literal["saliency", "input_x_gradient", "smoothgrad", "integrated_gradients", "guided_backprop"]
METHODS: tuple[str, ...] = ("saliency", "input_x_gradient", "smoothgrad", "integrated_gradients", "guided_backprop")
_SIGNED = {"saliency": False, "smoothgrad": False, "input_x_gradient": True, "integrated_gradients": True,
           "guided_backprop": True}  # fmt: skip


class SaliencyMonitor(PeriodicDumpCallback):
    """Where the network looks, epoch by epoch: attribution maps of ``num_examples`` fixed validation examples.

    The examples are chosen once at fit start by :func:`~lightning_interp.examples.select_examples` (the first
    validation examples, spread round-robin over the classes; the same rule as RepresenterMonitor) unless given
    as ``inputs``/``targets``. Every ``every_n_epochs`` training epochs and at the end of fit, each method in
    ``methods`` explains the score of the true label (``target="predicted"``: of the predicted class), with the model
    in eval mode; every module's own mode, BatchNorm statistics, parameters' ``.grad`` and ``requires_grad``, and
    the global RNG are left as they were. Images are computed and written on global rank 0 only.

    TensorBoard (a TensorBoardLogger is needed; one warning otherwise), at ``step = trainer.global_step``:

    * ``saliency/<method>/examples`` (image): for images (B, 1|3, H, W) rows = examples, columns = the label and
      the prediction with its probability, the input, the heatmap (channels summed, scaled per example to its
      99th percentile; unsigned maps dark to yellow, signed maps blue = negative, red = positive) and the overlay;
      for tabular inputs (B, F) a heatmap examples x features (feature names on top when given) over a bar chart
      of mean |attribution| per feature; for sequences (B, T, D) one strip per example, one cell per position;
    * ``saliency/predictions`` (text): label, predicted class and its probability per example.

    One image per method per dump under a fixed tag: start TensorBoard with ``--samples_per_plugin images=1000``
    to keep every epoch on the step slider (it keeps 10 by default).

    With ``randomization_check=True`` (Adebayo et al. 2018), also logged through ``LightningModule.log`` (any
    logger) at each epoch dump: ``saliency/<method>/randomization_rank_corr``, the Spearman rank correlation of
    |attribution| between the trained model and a re-initialised copy (mean over examples). Near 1: the maps do not
    depend on what the network learned. This doubles the dump cost and runs on every rank (so that every rank
    makes the same ``log`` calls).

    Args:
        methods: any of ``saliency``, ``input_x_gradient``, ``smoothgrad``, ``integrated_gradients``,
            ``guided_backprop``.
        num_examples: how many validation examples to follow.
        every_n_epochs: dump every this many training epochs (and always at the end of fit).
        target: explain the ``"label"`` (true class) or the ``"predicted"`` class.
        smoothgrad_stdev: SmoothGrad noise in input units; ``None``: 0.15 x the examples' value range (Smilkov et
            al. recommend 10-20% of the range).
        smoothgrad_samples: noisy copies per example.
        ig_steps: Gauss-Legendre points of Integrated Gradients (baseline: zeros).
        randomization_check: log the model-randomization rank correlation (see above).
        inputs: examples to follow instead of the validation data, ``(K, ...)``.
        targets: their class labels, ``(K,)`` (``None``: the predicted class is explained).
        feature_names: names of tabular features, drawn above the heatmap columns.
        class_names: names of the classes for the captions.
        batch_adapter: ``batch -> (inputs, targets)`` for batch formats that are not ``(x, y)`` pairs or dicts.
        seed: seed of the example choice, the SmoothGrad noise and the re-initialised copy.

    Example:
        >>> import tempfile
        >>> from lightning import Trainer
        >>> from lightning.pytorch.loggers import TensorBoardLogger
        >>> from lightning_interp.data import DigitsDataModule
        >>> from lightning_interp.models import DigitsCNN
        >>> monitor = SaliencyMonitor(num_examples=2, smoothgrad_samples=2, ig_steps=4)
        >>> trainer = Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[monitor],
        ...                   logger=TensorBoardLogger(tempfile.mkdtemp()), enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(DigitsCNN(), DigitsDataModule())
        >>> monitor.last_maps["saliency"].shape
        torch.Size([2, 1, 8, 8])
    """

    STATE_VERSION = 1
    WHERE_TO_LOOK = "Images `saliency/<method>/examples` (step slider = epochs); Text `saliency/predictions`"

    def __init__(
        self,
        methods: Sequence[Method] = ("saliency", "smoothgrad", "integrated_gradients"),
        num_examples: int = 8,
        every_n_epochs: int = 1,
        target: Literal["label", "predicted"] = "label",
        smoothgrad_stdev: float | None = None,
        smoothgrad_samples: int = 6,
        ig_steps: int = 6,
        randomization_check: bool = False,
        inputs: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        feature_names: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        batch_adapter: BatchAdapter | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.methods = check_choices("methods", methods, METHODS)
        self.num_examples = check_positive_int("num_examples", num_examples)
        self.every_n_epochs = check_positive_int("every_n_epochs", every_n_epochs)
        self.target = check_choice("target", target, ("label", "predicted"))
        self.smoothgrad_stdev = (
            None if smoothgrad_stdev is None else check_positive_float("smoothgrad_stdev", smoothgrad_stdev)
        )
        self.smoothgrad_samples = check_positive_int("smoothgrad_samples", smoothgrad_samples)
        self.ig_steps = check_positive_int("ig_steps", ig_steps)
        self.randomization_check = bool(randomization_check)
        self.feature_names = None if feature_names is None else [str(n) for n in feature_names]
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        self.batch_adapter = batch_adapter
        self.seed = seed
        self._given = inputs is not None
        self._examples: tuple[torch.Tensor, torch.Tensor | None] | None = None
        if inputs is not None:
            drawable = isinstance(inputs, torch.Tensor) and inputs.is_floating_point() and input_kind(inputs.shape)
            if not drawable:
                raise LightningInterpError(
                    "Expected argument `inputs` to be a float tensor of images (K, 1|3, H, W), tabular rows (K, F) "
                    f"or sequences (K, T, D), but got {_describe(inputs)}."
                )
            if targets is not None and (not isinstance(targets, torch.Tensor) or targets.shape != inputs.shape[:1]):
                raise LightningInterpError(
                    f"Expected argument `targets` to be a tensor of shape ({inputs.shape[0]},), "
                    f"but got {_describe(targets)}."
                )
            self._examples = (inputs.detach().clone(), None if targets is None else targets.detach().clone())
        self.last_maps: dict[str, torch.Tensor] = {}
        self.dumps = 0
        self._last_dump_step: int | None = None
        self._random_state: dict[str, torch.Tensor] | None = None

    @override
    def _config(self) -> dict[str, Any]:
        return {
            "methods": self.methods,
            "num_examples": self.num_examples,
            "every_n_epochs": self.every_n_epochs,
            "target": self.target,
            "smoothgrad_stdev": self.smoothgrad_stdev,
            "smoothgrad_samples": self.smoothgrad_samples,
            "ig_steps": self.ig_steps,
            "randomization_check": self.randomization_check,
            "seed": self.seed,
        }

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._refuse_sharded(trainer, "its maps run the model's forward on rank 0 alone, which a sharded model cannot")

    # ---- choosing the examples -----------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._random_state = None
        if self._given:
            return
        source, origin = example_source(trainer)
        if origin == "train":
            self.problems.report("train_examples", "no validation data; the examples are taken from the training data")
        if source is None:
            self.problems.report("no_data", "no validation or training data to choose examples from; no dumps")
            self._examples = None
            return
        inputs, targets, _ = select_examples(source, self.num_examples, self.seed, self.batch_adapter)
        if not inputs.is_floating_point() or input_kind(inputs.shape) is None:
            self.problems.report(
                "undrawable",
                f"inputs of {_describe(inputs)} cannot be drawn (images (B, 1|3, H, W), tabular (B, F) or "
                "sequences (B, T, D) can); no saliency dumps. Pass `inputs=` in a drawable shape",
            )
            self._examples = None
            return
        self._examples = (inputs, targets)

    # ---- when ----------------------------------------------------------------------------------------------
    # ---- the dump ------------------------------------------------------------------------------------------
    def _dump(self, trainer: Trainer, pl_module: LightningModule, log_scalars: bool) -> None:
        if self._examples is None:
            return
        self._last_dump_step = trainer.global_step
        writer = tensorboard_writer(trainer, self.problems)
        check = self.randomization_check and log_scalars
        if writer is None and not check:
            return  # ranks > 0 and runs without TensorBoard have nothing to draw
        modes = [(module, module.training) for module in pl_module.modules()]
        correlations: dict[str, float] = {}
        try:
            pl_module.eval()
            with torch.inference_mode(False), torch.enable_grad():
                result = self._compute(pl_module, check)
        finally:
            for module, mode in modes:
                module.training = mode
        if check:
            correlations = result[1] if result is not None else {}
            for method in self.methods:
                pl_module.log(
                    f"saliency/{method}/randomization_rank_corr",
                    correlations.get(method, float("nan")),
                    on_step=False,
                    on_epoch=True,
                    sync_dist=True,
                )
        if result is None or writer is None:
            return
        (x, labels, predicted, probability), _ = result
        self.dumps += 1
        captions = [self._caption(labels, predicted, probability, i) for i in range(x.shape[0])]
        for method, maps in self.last_maps.items():
            picture = self._draw(x, maps, method, captions)
            writer.add_image(f"saliency/{method}/examples", picture, trainer.global_step, dataformats="HWC")
        writer.add_text("saliency/predictions", self._table(labels, predicted, probability), trainer.global_step)
        writer.flush()

    def _compute(self, model: nn.Module, check: bool) -> Any:
        """Maps of every method (into ``self.last_maps``) and the randomization correlations; ``None`` on failure."""
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        x = self._examples[0].to(device)
        labels = self._examples[1]
        self.last_maps = {}
        try:
            with torch.no_grad():
                logits = model(x)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
                raise LightningInterpError(
                    f"the model returned {_describe(logits)}, not (batch, classes) scores"
                )
            probs = logits.float().softmax(1)
            probability, predicted = probs.max(1)
            targets = predicted
            if self.target == "label" and labels is not None:
                if labels.is_floating_point() or labels.dim() != 1:
                    self.problems.report(
                        "bad_labels", "labels are not class indices; the predicted class is explained"
                    )
                else:
                    targets = labels.to(device)
            self.last_maps = {k: v.cpu() for k, v in self._attribute_all(model, x, targets).items()}
            correlations = {}
            if check:
                randomized = _WithState(model, self._randomized(model))
                for method, other in self._attribute_all(randomized, x, targets).items():
                    correlations[method] = _rank_correlation(self.last_maps[method], other.cpu())
        except Exception as err:  # noqa: BLE001 - a failing dump must never stop training
            self.problems.report(
                "dump_failed", f"a saliency dump failed ({type(err).__name__}: {err}); training continues"
            )
            self.last_maps = {}
            return None
        return (self._examples[0], labels, predicted.cpu(), probability.cpu()), correlations

    def _attribute_all(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every method's maps. The gradient methods share one chunked pass over all their points (the examples,
        their noisy copies, their IG interpolants): on CPU a few small passes cost much more than one larger one.
        The results equal :func:`saliency`, :func:`input_x_gradient`, :func:`smoothgrad` (with this noise) and
        :func:`integrated_gradients` (Gauss-Legendre, zero baseline)."""
        batch, shape = x.shape[0], x.shape[1:]
        view = (-1,) + (1,) * len(shape)
        parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if {"saliency", "input_x_gradient"} & set(self.methods):
            parts["plain"] = (x, targets)
        if "smoothgrad" in self.methods:
            parts["smoothgrad"] = (
                x.repeat_interleave(self.smoothgrad_samples, 0) + self.smoothgrad_noise(x).flatten(0, 1),
                targets.repeat_interleave(self.smoothgrad_samples),
            )
        if "integrated_gradients" in self.methods:
            alphas, _ = quadrature("gausslegendre", self.ig_steps)
            alpha = torch.as_tensor(alphas, dtype=x.dtype, device=x.device)
            parts["integrated_gradients"] = (
                (alpha.view(view) * x.unsqueeze(1)).flatten(0, 1),  # example-major: (batch, steps, ...)
                targets.repeat_interleave(self.ig_steps),
            )
        maps: dict[str, torch.Tensor] = {}
        if parts:
            points = torch.cat([p for p, _ in parts.values()])
            rows = torch.cat([t for _, t in parts.values()])
            as_target(rows, rows.shape[0], rows.device)  # negative labels fail here with a clear message
            grads = torch.empty_like(points)
            with gradient_scope(model):
                total = points.shape[0]
                passes = input_gradients(model, total, lambda a, b: points[a:b], lambda a, b: rows[a:b])
                for start, stop, g in passes:
                    grads[start:stop] = g
            offset = 0
            for name, (p, _) in parts.items():
                g = grads[offset : offset + p.shape[0]]
                offset += p.shape[0]
                if name == "plain":
                    if "saliency" in self.methods:
                        maps["saliency"] = g.abs()
                    if "input_x_gradient" in self.methods:
                        maps["input_x_gradient"] = x * g
                elif name == "smoothgrad":
                    maps["smoothgrad"] = g.abs().view(batch, self.smoothgrad_samples, *shape).mean(1)
                else:  # example-major interpolants: (batch, steps, ...)
                    _, weights = quadrature("gausslegendre", self.ig_steps)
                    weight = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
                    g = g.view(batch, self.ig_steps, *shape)
                    maps["integrated_gradients"] = x * (g * weight.view(1, -1, *(1,) * len(shape))).sum(1)
        if "guided_backprop" in self.methods:
            maps["guided_backprop"] = guided_backprop(model, x, targets)
        return {method: maps[method] for method in self.methods}

    def smoothgrad_noise(self, x: torch.Tensor) -> torch.Tensor:
        """The SmoothGrad noise of a dump, ``(K, smoothgrad_samples, ...)``: the same at every dump (seeded), with
        standard deviation ``smoothgrad_stdev`` or 0.15 x the examples' value range."""
        stdev = self.smoothgrad_stdev
        if stdev is None:
            spread = float(x.max() - x.min())
            stdev = 0.15 * spread if spread > 0 else 0.1
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        noise = torch.randn((x.shape[0], self.smoothgrad_samples, *x.shape[1:]), generator=generator, device=x.device)
        return noise.to(x.dtype) * stdev

    def _randomized(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self._random_state is None:
            self._random_state = _reinitialised_state(model, self.seed)
        return self._random_state

    # ---- drawing -------------------------------------------------------------------------------------------
    def _name(self, cls: int) -> str:
        if self.class_names is not None and 0 <= cls < len(self.class_names):
            return self.class_names[cls][:10]
        return str(cls)

    def _caption(
        self, labels: torch.Tensor | None, predicted: torch.Tensor, probability: torch.Tensor, i: int
    ) -> list[str]:
        lines = []
        if labels is not None and labels.dim() == 1 and not labels.is_floating_point():
            lines.append(f"label {self._name(int(labels[i]))}")
        lines.append(f"pred {self._name(int(predicted[i]))} ({float(probability[i]):.2f})")
        return lines

    def _draw(self, x: torch.Tensor, maps: torch.Tensor, method: str, captions: list[list[str]]) -> np.ndarray:
        kind, signed = input_kind(x.shape), _SIGNED[method]
        if kind == "image":
            return image_grid(x, maps, signed, captions)
        flat = [" ".join(c) for c in captions]
        if kind == "tabular":
            return tabular_chart(maps, signed, flat, self.feature_names)
        return sequence_strip(maps, signed, flat)

    def _table(self, labels: torch.Tensor | None, predicted: torch.Tensor, probability: torch.Tensor) -> str:
        rows = ["| example | label | predicted | probability |", "|---|---|---|---|"]
        for i in range(predicted.shape[0]):
            label = self._name(int(labels[i])) if labels is not None and not labels.is_floating_point() else "-"
            rows.append(f"| {i} | {label} | {self._name(int(predicted[i]))} | {float(probability[i]):.3f} |")
        return "\n".join(rows)

    # ---- state ---------------------------------------------------------------------------------------------
    @override
    def _state(self) -> dict[str, Any]:
        return {"dumps": self.dumps, "last_dump_step": self._last_dump_step}

    @override
    def _load_state(self, state: dict[str, Any]) -> None:
        self.dumps = int(state["dumps"])
        self._last_dump_step = state["last_dump_step"]


class _WithState(nn.Module):
    """``model`` evaluated with other parameters and buffers (``torch.func.functional_call``); the model is a
    submodule, so guided backprop still finds its ReLUs."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.state, (x,))


def _reinitialised_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Fresh parameters drawn from the model's own generator-free default scheme, with our generator: weights
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's Linear/Conv default), biases likewise, normalization gains 1 and
    shifts 0, running statistics reset."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        weight = getattr(module, "weight", None)
        fan_in = weight[0].numel() if isinstance(weight, torch.Tensor) and weight.dim() >= 2 else None
        for name, param in module.named_parameters(recurse=False):
            key = f"{prefix}.{name}" if prefix else name
            if isinstance(module, NORMALIZATIONS):
                fresh = torch.ones_like(param) if name == "weight" else torch.zeros_like(param)
            else:
                bound = 1.0 / math.sqrt(fan_in or (param[0].numel() if param.dim() >= 2 else param.numel()))
                fresh = (torch.rand(param.shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            state[key] = fresh.to(device=param.device, dtype=param.dtype)
        for name, buffer in module.named_buffers(recurse=False):
            key = f"{prefix}.{name}" if prefix else name
            if name == "running_mean":
                state[key] = torch.zeros_like(buffer)
            elif name == "running_var":
                state[key] = torch.ones_like(buffer)
    return state


def _rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over examples of Spearman's rank correlation between |a| and |b| (flattened per example)."""
    values = []
    for x, y in zip(a.abs().reshape(a.shape[0], -1).double(), b.abs().reshape(b.shape[0], -1).double()):
        rx = x.argsort().argsort().double()
        ry = y.argsort().argsort().double()
        rx, ry = rx - rx.mean(), ry - ry.mean()
        denominator = float(rx.norm() * ry.norm())
        values.append(float((rx * ry).sum()) / denominator if denominator > 0 else float("nan"))
    return float(np.nanmean(values)) if values else float("nan")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
