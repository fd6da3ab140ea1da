"""SaliencyMonitor: saliency maps of a fixed set of validation examples, drawn into TensorBoard during ``fit``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from lightning import LightningModule, Trainer
from torch import nn
from torch.func import functional_call
from typing_extensions import override

from lightning_interp._validation import check_choice, check_choices, check_positive_float, check_positive_int
from lightning_interp.attribution._gradients import as_target, example_rows, gradient_scope, input_gradients
from lightning_interp.attribution.embeddings import (
    TOKEN_METHODS,
    _baseline_ids,
    default_baseline_token,
    input_embedding,
    token_maps,
)
from lightning_interp.attribution.gradients import guided_backprop, quadrature
from lightning_interp.batches import BatchAdapter, ModelBatch, call_model, logits_of, unpack_batch
from lightning_interp.callbacks._base import PeriodicDumpCallback
from lightning_interp.errors import LightningInterpError
from lightning_interp.examples import example_source, select_example_batch
from lightning_interp.layers import NORMALIZATIONS, Layer
from lightning_interp.saliency_render import image_grid, input_kind, sequence_strip, tabular_chart, token_strip
from lightning_interp.tensorboard import add_rgb_image, tensorboard_writer

__all__ = ["SaliencyMonitor"]

Method = Literal["saliency", "input_x_gradient", "smoothgrad", "integrated_gradients", "guided_backprop"]
METHODS: tuple[str, ...] = ("saliency", "input_x_gradient", "smoothgrad", "integrated_gradients", "guided_backprop")
_SIGNED = {"saliency": False, "smoothgrad": False, "input_x_gradient": True, "integrated_gradients": True,
           "guided_backprop": True}  # fmt: skip


class SaliencyMonitor(PeriodicDumpCallback):
    """Where the network looks, epoch by epoch: attribution maps of ``num_examples`` fixed validation examples.

    The examples are chosen once at fit start by :func:`~lightning_interp.examples.select_example_batch` (the first
    validation examples, spread round-robin over the classes; the same rule as RepresenterMonitor) unless given
    as ``inputs``/``targets``. Dict batches are read as Hugging Face models take them: the input under
    ``input_ids`` / ``pixel_values`` / ... , the labels under ``labels``, and the batch's other tensors
    (``attention_mask``, ``token_type_ids``) kept with each example. Every ``every_n_epochs`` training epochs and
    at the end of fit, each method in ``methods`` explains the score of the true label (``target="predicted"``: of
    the predicted class), with the model in eval mode; every module's own mode, BatchNorm statistics, parameters'
    ``.grad`` and ``requires_grad``, and the global RNG are left as they were. Images are computed and written on
    global rank 0 only.

    How the model is called (:func:`~lightning_interp.batches.call_model`): for ``(x, y)`` batches, ``model(x)``;
    for dict batches, by keyword when ``forward`` names the input key (a Hugging Face model, or
    ``forward(self, input_ids, attention_mask=None)``), positionally otherwise, with the batch's other tensors
    that ``forward`` names (``attention_mask=...``); the labels are never passed. The scores are what it returns, or
    its ``logits`` (a ``ModelOutput``). In every pass (the noisy copies, the interpolants, the randomization check)
    each point carries its own example's ``attention_mask`` and other tensors.

    Token ids (integer ``(B, T)`` inputs) are attributed at the output of the input embedding layer
    (``get_input_embeddings()`` of the model or of the Hugging Face model it wraps, else the first
    ``nn.Embedding``; ``embedding_layer=`` names another), one score per token reduced over the embedding
    dimension (:func:`~lightning_interp.attribution.embedding_attributions`, equal to Captum's layer methods):
    saliency = the L2 norm of the gradient, input x gradient = sum of embedding x gradient, Integrated Gradients
    from the embedding of ``baseline_token_id`` (default: the model config's ``pad_token_id``, else the embedding's
    ``padding_idx``, else the zero embedding) interpolated in embedding space, SmoothGrad with noise added to the
    embeddings. Guided backprop does not apply to tokens: it is skipped (one warning).

    TensorBoard (a TensorBoardLogger is needed; one warning otherwise), at ``step = trainer.global_step``:

    * ``saliency/<method>/examples`` (image): for images (B, 1|3, H, W) rows = examples, columns = the label and
      the prediction with its probability, the input, the heatmap (channels summed, scaled per example to its
      99th percentile; unsigned maps dark to yellow, signed maps blue = negative, red = positive) and the overlay;
      for tabular inputs (B, F) a heatmap examples x features (feature names on top when given) over a bar chart
      of mean |attribution| per feature; for sequences (B, T, D) one strip per example, one cell per position;
      for token ids one strip per example under its label, prediction and probability: each real token (padding,
      ``attention_mask`` 0, left out) a cell coloured by its score (the same colour maps, per-example scale) and
      labelled with its id, or its text given ``tokenizer=`` or ``id_to_token=``;
    * ``saliency/predictions`` (text): label, predicted class and its probability per example.

    One image per method per dump under a fixed tag: start TensorBoard with ``--samples_per_plugin images=1000``
    to keep every epoch on the step slider (it keeps 10 by default).

    With ``randomization_check=True`` (Adebayo et al. 2018), also logged through ``LightningModule.log`` (any
    logger) at each epoch dump: ``saliency/<method>/randomization_rank_corr``, the Spearman rank correlation of
    |attribution| between the trained model and a re-initialised copy (mean over examples; real tokens only).
    Near 1: the maps do not depend on what the network learned. This doubles the dump cost and runs on every rank
    (so that every rank makes the same ``log`` calls).

    Inputs it cannot draw or attribute (a batch it cannot read, token ids without an embedding layer, an
    undrawable shape) stop nothing: one warning names the argument to pass, and the monitor stays idle.

    Args:
        methods: any of ``saliency``, ``input_x_gradient``, ``smoothgrad``, ``integrated_gradients``,
            ``guided_backprop``.
        num_examples: how many validation examples to follow.
        every_n_epochs: dump every this many training epochs (and always at the end of fit).
        target: explain the ``"label"`` (true class) or the ``"predicted"`` class.
        smoothgrad_stdev: SmoothGrad noise in input units (embedding units for tokens); ``None``: 0.15 x the
            examples' value range (of their embeddings for tokens; Smilkov et al. recommend 10-20% of the range).
        smoothgrad_samples: noisy copies per example.
        ig_steps: Gauss-Legendre points of Integrated Gradients (baseline: zeros; for tokens see above).
        randomization_check: log the model-randomization rank correlation (see above).
        inputs: examples to follow instead of the validation data: a tensor ``(K, ...)`` (float images, rows or
            sequences, or integer token ids ``(K, T)``) or a dict batch (``{"input_ids": ..., "attention_mask":
            ..., "labels": ...}``).
        targets: their class labels, ``(K,)`` (``None``: a dict's labels, else the predicted class is explained).
        feature_names: names of tabular features, drawn above the heatmap columns.
        class_names: names of the classes for the captions.
        batch_adapter: ``batch -> (inputs, targets)`` for batch formats that are not ``(x, y)`` pairs or dicts.
        embedding_layer: name (in ``pl_module.named_modules()``) of the module whose output token attributions are
            taken at; ``None``: found as described above.
        baseline_token_id: the token whose embedding is the Integrated Gradients baseline for token inputs (e.g. the
            pad or mask token); ``None``: as described above.
        tokenizer: draws each token as text: anything with ``convert_ids_to_tokens`` (a Hugging Face tokenizer)
            or ``decode``.
        id_to_token: draws each token as ``id_to_token(id)`` (a callable ``int -> str``); instead of ``tokenizer``.
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
        inputs: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
        targets: torch.Tensor | None = None,
        feature_names: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        batch_adapter: BatchAdapter | None = None,
        embedding_layer: str | None = None,
        baseline_token_id: int | None = None,
        tokenizer: Any = None,
        id_to_token: Callable[[int], str] | None = None,
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
        if embedding_layer is not None and (not isinstance(embedding_layer, str) or not embedding_layer):
            raise LightningInterpError(
                f"Expected argument `embedding_layer` to be a module name (a str) or None, but got {embedding_layer!r}."
            )
        self.embedding_layer = embedding_layer
        if baseline_token_id is not None:
            check_positive_int("baseline_token_id", baseline_token_id, minimum=0)
        self.baseline_token_id = baseline_token_id
        if tokenizer is not None and id_to_token is not None:
            raise LightningInterpError(
                "Expected one of the arguments `tokenizer` and `id_to_token`, but got both; pass only one."
            )
        if tokenizer is not None and not (
            callable(getattr(tokenizer, "convert_ids_to_tokens", None)) or callable(getattr(tokenizer, "decode", None))
        ):
            raise LightningInterpError(
                "Expected argument `tokenizer` to have a `convert_ids_to_tokens` or `decode` method, but got "
                f"{type(tokenizer).__name__}; pass `id_to_token=` (a callable id -> str) instead."
            )
        if id_to_token is not None and not callable(id_to_token):
            raise LightningInterpError(
                f"Expected argument `id_to_token` to be a callable id -> str, but got {type(id_to_token).__name__}."
            )
        self.tokenizer = tokenizer
        self.id_to_token = id_to_token
        self.seed = seed
        self._given = inputs is not None
        self._batch: ModelBatch | None = None
        self._kind: str | None = None  # "image", "tabular", "sequence" or "tokens"
        self._embedding: Layer | None = None
        self._baseline_token: int | None = None
        if inputs is not None:
            self._batch = self._given_batch(inputs, targets)
            self._kind = _kind_of(self._batch.inputs)
        self.last_maps: dict[str, torch.Tensor] = {}
        self.dumps = 0
        self._last_dump_step: int | None = None
        self._random_state: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _given_batch(inputs: Any, targets: Any) -> ModelBatch:
        if isinstance(inputs, Mapping):
            batch = unpack_batch(inputs, require_targets=False)
        elif isinstance(inputs, torch.Tensor):
            batch = ModelBatch(inputs)
        else:
            batch = None
        if batch is None or _kind_of(batch.inputs) is None:
            raise LightningInterpError(
                "Expected argument `inputs` to be a float tensor of images (K, 1|3, H, W), tabular rows (K, F) "
                "or sequences (K, T, D), integer token ids (K, T), or a dict batch holding one, but got "
                f"{_describe(batch.inputs if batch is not None else inputs)}."
            )
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.shape != batch.inputs.shape[:1]:
                raise LightningInterpError(
                    f"Expected argument `targets` to be a tensor of shape ({batch.inputs.shape[0]},), "
                    f"but got {_describe(targets)}."
                )
            batch = ModelBatch(batch.inputs, targets, batch.key, batch.extras)
        return batch.detached()

    @property
    def _examples(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The followed examples' inputs and targets (``None`` before fit or when idle)."""
        return None if self._batch is None else (self._batch.inputs, self._batch.targets)

    @override
    def _config(self) -> dict[str, Any]:
        config = {
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
        # only when set: the state_key of a configuration that existed before these arguments does not change
        for name in ("embedding_layer", "baseline_token_id"):
            if getattr(self, name) is not None:
                config[name] = getattr(self, name)
        return config

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._refuse_sharded(trainer, "its maps run the model's forward on rank 0 alone, which a sharded model cannot")
        self._embedding = None
        if self.embedding_layer is not None:  # an explicit bad name fails here, before any training
            self._embedding = input_embedding(pl_module, self.embedding_layer, argument="embedding_layer")

    @override
    def _watched_layers(self) -> list[str]:
        return [self._embedding.name] if self._embedding is not None and self._kind == "tokens" else []

    # ---- choosing the examples -----------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._random_state = None
        if not self._given:
            self._batch = self._choose_examples(trainer)
            self._kind = None if self._batch is None else self._drawable_kind(self._batch.inputs)
            if self._kind is None:
                self._batch = None
        if self._kind == "tokens" and not self._prepare_tokens(pl_module):
            self._batch, self._kind = None, None
        super().on_train_start(trainer, pl_module)  # the run summary names the embedding layer found above

    def _choose_examples(self, trainer: Trainer) -> ModelBatch | None:
        source, origin = example_source(trainer)
        if origin == "train":
            self.problems.report("train_examples", "no validation data; the examples are taken from the training data")
        if source is None:
            self.problems.report("no_data", "no validation or training data to choose examples from; no dumps")
            return None
        try:
            batch, _ = select_example_batch(source, self.num_examples, self.seed, self.batch_adapter)
        except LightningInterpError as err:  # a batch format it cannot read must not stop the fit
            self.problems.report("unreadable_batch", f"{err} No saliency dumps")
            return None
        return batch

    def _drawable_kind(self, inputs: torch.Tensor) -> str | None:
        kind = _kind_of(inputs)
        if kind is None:
            self.problems.report(
                "undrawable",
                f"inputs of {_describe(inputs)} cannot be drawn (images (B, 1|3, H, W), tabular (B, F), "
                "sequences (B, T, D) or token ids (B, T) can); no saliency dumps. Pass `inputs=` in a drawable "
                "shape (or `batch_adapter=` to read the batch)",
            )
        return kind

    def _prepare_tokens(self, pl_module: LightningModule) -> bool:
        """Find the embedding layer and the baseline token for token-id inputs; warn and say no when there is none."""
        if self._embedding is None:
            self._embedding = input_embedding(pl_module)
        if self._embedding is None:
            self.problems.report(
                "no_embedding",
                f"the inputs are token ids ({_describe(self._batch.inputs)}) but the model has no input embedding "
                "layer (no `get_input_embeddings()`, no nn.Embedding); no saliency dumps. Pass `embedding_layer=` "
                "(the name of the module that embeds the tokens)",
            )
            return False
        self._baseline_token = (
            self.baseline_token_id
            if self.baseline_token_id is not None
            else default_baseline_token(pl_module, self._embedding.module)
        )
        if "guided_backprop" in self.methods:
            self.problems.report(
                "guided_backprop_tokens",
                "guided backprop does not apply to token inputs (it guides ReLUs between the input and the "
                "output, and token ids have no gradient); it is skipped. Remove it from `methods`",
            )
        return True

    # ---- the dump ------------------------------------------------------------------------------------------
    def _dump(self, trainer: Trainer, pl_module: LightningModule, log_scalars: bool) -> None:
        if self._batch is None:
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
        (batch, labels, predicted, probability), _ = result
        self.dumps += 1
        captions = [self._caption(labels, predicted, probability, i) for i in range(len(batch))]
        for method, maps in self.last_maps.items():
            picture = self._draw(batch, maps, method, captions)
            add_rgb_image(writer, f"saliency/{method}/examples", picture, trainer.global_step)
        writer.add_text("saliency/predictions", self._table(labels, predicted, probability), trainer.global_step)
        writer.flush()

    def _compute(self, model: nn.Module, check: bool) -> Any:
        """Maps of every method (into ``self.last_maps``) and the randomization correlations; ``None`` on failure."""
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        batch = self._batch.to(device)  # type: ignore[union-attr]
        labels = self._batch.targets  # type: ignore[union-attr]
        forward = _BatchForward(model, batch.key)
        self.last_maps = {}
        try:
            with torch.no_grad():
                logits = forward(batch.inputs, **batch.extras)
            if logits.dim() != 2 or logits.shape[0] != len(batch):
                raise LightningInterpError(f"the model returned {_describe(logits)}, not (batch, classes) scores")
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
            self.last_maps = {k: v.cpu() for k, v in self._attribute_all(forward, batch, targets).items()}
            correlations = {}
            if check:
                state = {f"model.{k}": v for k, v in self._randomized(model).items()}
                real = None if self._kind != "tokens" else _real_tokens(self._batch)
                for method, other in self._attribute_all(_WithState(forward, state), batch, targets).items():
                    correlations[method] = _rank_correlation(self.last_maps[method], other.cpu(), real)
        except Exception as err:  # noqa: BLE001 - a failing dump must never stop training
            self.problems.report(
                "dump_failed", f"a saliency dump failed ({type(err).__name__}: {err}); training continues"
            )
            self.last_maps = {}
            return None
        return (self._batch, labels, predicted.cpu(), probability.cpu()), correlations

    def _attribute_all(self, model: nn.Module, batch: ModelBatch, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every method's maps. The gradient methods share one chunked pass over all their points (the examples,
        their noisy copies, their IG interpolants): on CPU a few small passes cost much more than one larger one.
        The results equal :func:`saliency`, :func:`input_x_gradient`, :func:`smoothgrad` (with this noise) and
        :func:`integrated_gradients` (Gauss-Legendre, zero baseline), or for token ids
        :func:`~lightning_interp.attribution.embedding_attributions` (this seed's noise); the batch's other
        tensors (``attention_mask``) follow each point's example."""
        if self._kind == "tokens":
            return self._token_maps(model, batch, targets)
        x = batch.inputs
        count, shape = x.shape[0], x.shape[1:]
        view = (-1,) + (1,) * len(shape)
        examples = torch.arange(count, device=x.device)
        parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (points, example of each point)
        if {"saliency", "input_x_gradient"} & set(self.methods):
            parts["plain"] = (x, examples)
        if "smoothgrad" in self.methods:
            parts["smoothgrad"] = (
                x.repeat_interleave(self.smoothgrad_samples, 0) + self.smoothgrad_noise(x).flatten(0, 1),
                examples.repeat_interleave(self.smoothgrad_samples),
            )
        if "integrated_gradients" in self.methods:
            alphas, _ = quadrature("gausslegendre", self.ig_steps)
            alpha = torch.as_tensor(alphas, dtype=x.dtype, device=x.device)
            parts["integrated_gradients"] = (
                (alpha.view(view) * x.unsqueeze(1)).flatten(0, 1),  # example-major: (batch, steps, ...)
                examples.repeat_interleave(self.ig_steps),
            )
        maps: dict[str, torch.Tensor] = {}
        if parts:
            points = torch.cat([p for p, _ in parts.values()])
            example = torch.cat([e for _, e in parts.values()])
            rows = targets[example]
            as_target(rows, rows.shape[0], rows.device)  # negative labels fail here with a clear message
            grads = torch.empty_like(points)

            def forward(chunk: torch.Tensor, start: int, stop: int) -> torch.Tensor:
                return model(chunk, **example_rows(batch.extras, example[start:stop], count))

            with gradient_scope(model):
                total = points.shape[0]
                passes = input_gradients(model, total, lambda a, b: points[a:b], lambda a, b: rows[a:b], None, forward)
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
                    maps["smoothgrad"] = g.abs().view(count, self.smoothgrad_samples, *shape).mean(1)
                else:  # example-major interpolants: (batch, steps, ...)
                    _, weights = quadrature("gausslegendre", self.ig_steps)
                    weight = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
                    g = g.view(count, self.ig_steps, *shape)
                    maps["integrated_gradients"] = x * (g * weight.view(1, -1, *(1,) * len(shape))).sum(1)
        if "guided_backprop" in self.methods:
            maps["guided_backprop"] = guided_backprop(model, x, targets, forward_kwargs=batch.extras)
        return {method: maps[method] for method in self.methods}

    def _token_maps(self, model: nn.Module, batch: ModelBatch, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token maps of every method but guided backprop, in one pass (see :func:`token_maps`)."""
        methods = [m for m in self.methods if m in TOKEN_METHODS]
        if not methods:
            return {}
        ids = batch.inputs
        device = next((p.device for p in model.parameters()), ids.device)
        return token_maps(
            model,
            ids,
            targets,
            methods,
            self._embedding.module,  # type: ignore[union-attr, arg-type]
            baseline_ids=_baseline_ids(self._baseline_token, ids),
            forward_kwargs=batch.extras,
            n_steps=self.ig_steps,
            stdev=self.smoothgrad_stdev,
            n_samples=self.smoothgrad_samples,
            generator=torch.Generator(device=device).manual_seed(self.seed),
        )

    def smoothgrad_noise(self, x: torch.Tensor) -> torch.Tensor:
        """The SmoothGrad noise of a dump of float inputs, ``(K, smoothgrad_samples, ...)``: the same at every dump
        (seeded), with standard deviation ``smoothgrad_stdev`` or 0.15 x the examples' value range. (For token
        ids the noise is drawn on the embeddings, from ``torch.Generator().manual_seed(seed)``.)"""
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

    def _token_text(self, token_id: int) -> str:
        """How a token is drawn: its id, or its text from ``id_to_token`` / ``tokenizer`` (the id when they fail)."""
        try:
            if self.id_to_token is not None:
                return str(self.id_to_token(token_id))
            if self.tokenizer is not None:
                if callable(getattr(self.tokenizer, "convert_ids_to_tokens", None)):
                    text = self.tokenizer.convert_ids_to_tokens(token_id)
                    return str(text[0] if isinstance(text, (list, tuple)) else text)
                return str(self.tokenizer.decode([token_id])).strip()
        except Exception as err:  # noqa: BLE001 - a tokenizer that fails must not stop training
            self.problems.report(
                "token_text_failed", f"turning token {token_id} into text failed ({type(err).__name__}: {err}); "
                "ids are drawn instead"
            )  # fmt: skip
        return str(token_id)

    def _draw(self, batch: ModelBatch, maps: torch.Tensor, method: str, captions: list[list[str]]) -> np.ndarray:
        x, signed = batch.inputs, _SIGNED[method]
        kind = self._kind or input_kind(x.shape)
        if kind == "image":
            return image_grid(x, maps, signed, captions)
        if kind == "tokens":
            real = _real_tokens(batch)
            texts = [[self._token_text(int(i)) for i in row[keep].tolist()] for row, keep in zip(x, real)]
            lines = [["   ".join(c)] for c in captions]  # label, prediction and probability on one line
            return token_strip(texts, [m[keep] for m, keep in zip(maps, real)], signed, lines)
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


def _kind_of(inputs: Any) -> str | None:
    """How the examples are drawn: ``image``/``tabular``/``sequence`` for float inputs, ``tokens`` for integer ids
    ``(B, T)``; ``None`` when they cannot be."""
    if not isinstance(inputs, torch.Tensor):
        return None
    if inputs.is_floating_point():
        return input_kind(inputs.shape)
    integer = not inputs.is_complex() and inputs.dtype != torch.bool
    return "tokens" if integer and inputs.dim() == 2 and inputs.shape[1] > 0 else None


def _real_tokens(batch: ModelBatch) -> torch.Tensor:
    """Which positions hold real tokens: ``attention_mask`` != 0 (every position without a mask), ``(B, T)`` bool."""
    mask = batch.attention_mask
    if isinstance(mask, torch.Tensor) and mask.shape == batch.inputs.shape:
        return mask.detach().cpu() != 0
    return torch.ones(batch.inputs.shape, dtype=torch.bool)


class _BatchForward(nn.Module):
    """The model called on a batch the way its ``forward`` takes it (:func:`call_model`), returning the scores
    (:func:`logits_of`): ``forward(inputs, **extras)``, which the attribution functions call with each point's
    extras. The model is a submodule, so guided backprop still finds its ReLUs."""

    def __init__(self, model: nn.Module, key: str | None) -> None:
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, inputs: torch.Tensor, **extras: torch.Tensor) -> torch.Tensor:
        output = call_model(self.model, ModelBatch(inputs, None, self.key, dict(extras)), inputs)
        logits = logits_of(output)
        if logits is None:
            raise LightningInterpError(
                f"the model returned {_describe(output)}, not scores (a tensor, or an output holding `logits`)"
            )
        return logits


class _WithState(nn.Module):
    """``model`` evaluated with other parameters and buffers (``torch.func.functional_call``), called as ``model``
    is; the model is a submodule, so guided backprop still finds its ReLUs and token attributions its embedding
    layer (whose weight is swapped as well)."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.state = state

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return functional_call(self.model, self.state, args, kwargs)


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


def _rank_correlation(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """Mean over examples of Spearman's rank correlation between |a| and |b| (flattened per example; only where
    ``keep`` is true when given: the real tokens)."""
    values = []
    flat_keep = None if keep is None else keep.reshape(a.shape[0], -1)
    for i, (x, y) in enumerate(zip(a.abs().reshape(a.shape[0], -1).double(), b.abs().reshape(b.shape[0], -1).double())):
        if flat_keep is not None:
            x, y = x[flat_keep[i]], y[flat_keep[i]]
        if x.numel() < 2:
            continue
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
