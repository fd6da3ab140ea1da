"""RepresenterMonitor: which training examples support and oppose the predictions, refit every few epochs."""

from __future__ import annotations

import os
import time
from contextlib import closing
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate
from typing_extensions import override

from lightning_interp._distributed import all_gather_rows, all_reduce_, world_size
from lightning_interp._validation import check_optional_positive_int, check_positive_float, check_positive_int
from lightning_interp.attribution.representer import fit_representer, suspect_labels
from lightning_interp.attribution.similarity import nearest_examples, sparse_examples
from lightning_interp.batches import BatchAdapter, ModelBatch, call_model, logits_of, unpack_batch
from lightning_interp.callbacks._base import PeriodicDumpCallback
from lightning_interp.errors import LightningInterpError
from lightning_interp.examples import (
    example_source,
    is_map_style,
    preserved_rng,
    sample_batches,
    select_example_batch,
    training_loader,
)
from lightning_interp.layers import last_linear, named_submodules
from lightning_interp.render import tile, to_rgb, upscale
from lightning_interp.saliency_render import text_image
from lightning_interp.tensorboard import add_rgb_image, log_dir, tensorboard_writer

__all__ = ["RepresenterMonitor"]


class RepresenterMonitor(PeriodicDumpCallback):
    """Representer points (Yeh et al. 2018) during ``fit``: the training examples that support (proponents) and
    oppose (opponents) the predictions on fixed validation examples, training labels that look wrong, and
    validation examples the training data barely supports.

    Every ``every_n_epochs`` epochs and at the end of fit, in eval mode and without gradients: the inputs of the
    final ``nn.Linear`` (``layer``) are captured for the training set through the monitor's own non-shuffled pass
    over the training dataset (:func:`~lightning_interp.examples.sample_batches`: the dataset in index order, or a
    fixed subset of ``max_train_examples``; under DDP each rank takes a shard and the features are gathered), the
    head is refit exactly by :func:`~lightning_interp.attribution.fit_representer` to its own softmax outputs, and
    the fixed validation examples (:func:`~lightning_interp.examples.select_example_batch`, as SaliencyMonitor)
    are explained. Batches are read as the model sees them (tuples, or dicts with Hugging Face keys) and the model
    is called the way its ``forward`` takes them (:func:`~lightning_interp.batches.call_model`: ``attention_mask``,
    ``token_type_ids`` passed along).

    The features: the head's input when it is one vector per example (``(B, D)``: a pooled output, a CLS token, as
    in ``BertForSequenceClassification`` and ``ViTForImageClassification``). A head applied to every position,
    ``(B, T, D) -> (B, T, C)``, of which the model returns one position per example
    (``GPT2ForSequenceClassification``'s ``score`` at the last non-pad token): per example, the position whose head
    output equals the logits the model returned for it, value for value (the model's own choice read back, whatever
    the padding side), and that position's input. When the head's input cannot be made one vector per example (no
    position matches: the model pools the logits; per-token logits; a head that runs twice or never), or the model
    has no ``nn.Linear`` at all, the monitor warns once, naming ``layer=``, and stays idle for the fit (``idle``
    says why); an explicit ``layer=`` that names no ``nn.Linear`` fails at ``setup``.

    Logged through ``LightningModule.log`` (any logger, every rank): ``representer/stationarity`` (max |grad| of the
    refit), ``representer/decomposition_residual`` (relative error of ``z = sum_i alpha_i (f_i . f + 1)``),
    ``representer/agreement`` (fraction of training points where refit and model predict the same class) and
    ``representer/dump_seconds``.

    With a TensorBoardLogger (rank 0): histogram ``representer/alpha``; image ``representer/examples`` (per row a
    validation example, then its top proponents and opponents, captioned with label and value) or, for non-image
    inputs, text ``representer/examples`` (the same as a table; for token inputs with the first real token ids of
    each example); text ``representer/suspects`` (training labels ranked by
    :func:`~lightning_interp.attribution.suspect_labels`, with the model's loss beside) and
    ``representer/sparse`` (validation examples with the lowest mean cosine similarity to their nearest training
    examples). ``representer_epoch<N>.pt`` (alpha, dataset indices, labels, suspect ranking, top-k) is saved into
    the logger's directory on rank 0.

    Args:
        every_n_epochs: refit every this many training epochs (and once at the end of fit).
        layer: name of the final ``nn.Linear``; the last ``nn.Linear`` of the model when ``None``.
        lam: L2 penalty of the refit (the paper's 0.003).
        num_examples: validation examples explained.
        k: proponents and opponents shown per example.
        num_suspects: rows of the suspect-label table.
        max_train_examples: refit on a fixed random subset of this many training examples (drawn once from
            ``seed``; the whole training set when it is smaller, or when ``None``). Proponents, opponents and
            suspect labels are then found among that subset. At the default 8,192, on a 32,768-example problem
            (``benchmarks/bench_representer_cap.py``), the explained logits are within 0.3% of a refit on all of
            it, the predicted class the same for 99.9% of examples, 90% of the top-4 proponents among the sampled
            examples the same as the full refit ranks them, and the suspect ranking finds flipped labels as often
            (95% of the top 20) as on the whole set.
        sparse_pool: validation examples searched for sparse (unsupported) predictions.
        batch_size: batch size of the feature pass.
        tol: stationarity the refit runs to.
        batch_adapter: ``batch -> (inputs, targets)`` for batch formats that are not ``(x, y)`` pairs or dicts.
        seed: seed of the example choice and of the training subset.

    Example:
        >>> from lightning import Trainer
        >>> from lightning_interp.data import DigitsDataModule
        >>> from lightning_interp.models import DigitsCNN
        >>> monitor = RepresenterMonitor(every_n_epochs=1, max_train_examples=200, num_examples=2)
        >>> trainer = Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[monitor],
        ...                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                   enable_model_summary=False)
        >>> trainer.fit(DigitsCNN(), DigitsDataModule())  # doctest: +ELLIPSIS
        >>> monitor.last["alpha"].shape
        torch.Size([200, 10])
    """

    STATE_VERSION = 1
    WHERE_TO_LOOK = "Images `representer/examples`; Text `representer/suspects`, `representer/sparse`; Histograms `representer/alpha`"

    def __init__(
        self,
        every_n_epochs: int = 5,
        layer: str | None = None,
        lam: float = 0.003,
        num_examples: int = 8,
        k: int = 4,
        num_suspects: int = 20,
        max_train_examples: int | None = 8192,
        sparse_pool: int = 256,
        batch_size: int = 256,
        tol: float = 1e-9,
        batch_adapter: BatchAdapter | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.every_n_epochs = check_positive_int("every_n_epochs", every_n_epochs)
        if layer is not None and not isinstance(layer, str):
            raise LightningInterpError(
                f"Expected argument `layer` to be a module name (str) or None, but got {layer!r}."
            )
        self.layer = layer
        self.lam = check_positive_float("lam", lam)
        self.num_examples = check_positive_int("num_examples", num_examples)
        self.k = check_positive_int("k", k)
        self.num_suspects = check_positive_int("num_suspects", num_suspects)
        self.max_train_examples = check_optional_positive_int("max_train_examples", max_train_examples)
        self.sparse_pool = check_positive_int("sparse_pool", sparse_pool)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.tol = check_positive_float("tol", tol)
        self.batch_adapter = batch_adapter
        self.seed = seed
        self.head: nn.Linear | None = None
        self.last: dict[str, Any] = {}
        self.dumps = 0
        self._head_name = ""
        self._captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._capturing = False
        self._examples: ModelBatch | None = None
        self._pool: ModelBatch | None = None
        self._pool_index: torch.Tensor | None = None
        self._last_dump_step = -1
        self._epoch = 0

    @override
    def _config(self) -> dict[str, Any]:
        return {"every_n_epochs": self.every_n_epochs, "layer": self.layer, "lam": self.lam,
                "num_examples": self.num_examples, "k": self.k, "max_train_examples": self.max_train_examples,
                "seed": self.seed}  # fmt: skip

    # ---- set-up ------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._refuse_sharded(trainer, "its refit reads the whole last linear layer outside the model's forward")
        self.idle = None
        self.head = None
        if self.layer is None:
            found = last_linear(pl_module)
            if found is None:
                # a default-configured monitor never stops a fit: say what to pass and stay idle
                self._go_idle("no_head", "the model has no nn.Linear layer, so there is no final linear layer to "
                              "refit; pass `layer=` naming the model's final nn.Linear, or leave RepresenterMonitor "
                              "out for this model")  # fmt: skip
                return
            self.head, self._head_name = found.module, found.name  # type: ignore[assignment]
            return
        modules = dict(named_submodules(pl_module))
        if self.layer not in modules:
            raise LightningInterpError(
                f"Expected argument `layer` to name a module of the model, but got {self.layer!r}. Linear layers: "
                f"{[n for n, m in modules.items() if isinstance(m, nn.Linear)]}."
            )
        if not isinstance(modules[self.layer], nn.Linear):
            raise LightningInterpError(
                f"Expected argument `layer` to name an nn.Linear (the final classification layer), but "
                f"{self.layer!r} is {type(modules[self.layer]).__name__}."
            )
        self.head, self._head_name = modules[self.layer], self.layer  # type: ignore[assignment]

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._examples = self._pool = self._pool_index = None
        if self.idle is not None or self.head is None:
            return
        # registered here, not in setup: callbacks such as weight averaging deep-copy the model in their setup
        self.hooks.forward(self.head, self._hook)
        source, _ = example_source(trainer, fall_back_to_training=False)
        if source is None:
            self.problems.report("no_val_data", "no validation data; only suspect labels and alpha are shown")
            return
        try:
            self._examples, _ = select_example_batch(source, self.num_examples, self.seed, self.batch_adapter)
            self._pool, self._pool_index = select_example_batch(source, self.sparse_pool, self.seed,
                                                                self.batch_adapter)  # fmt: skip
        except Exception as err:  # noqa: BLE001 - unreadable validation data must not stop the fit
            self._examples = self._pool = self._pool_index = None
            self.problems.report("no_val_data", f"the validation examples could not be read ({type(err).__name__}: "
                                 f"{err}); only suspect labels and alpha are shown")  # fmt: skip

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._capturing and args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            self._captured.append((args[0].detach(), output.detach()))

    # ---- when ----------------------------------------------------------------------------------------------------
    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch = trainer.current_epoch  # at on_train_end the Trainer has already counted one epoch more

    # ---- the features --------------------------------------------------------------------------------------------
    def _batch_features(self, pl_module: LightningModule, batch: ModelBatch) -> torch.Tensor:
        """``(B, D)`` features of one batch: the head's input, one row per example (see :func:`_head_features`)."""
        self._captured = []
        self._capturing = True
        try:
            output = call_model(pl_module, batch)
        finally:
            self._capturing = False
        calls, self._captured = self._captured, []
        if len(calls) != 1:
            raise _HeadInputError(
                f"the head `{self._head_name}` ran {len(calls)} times in one forward of the model (expected once"
                f"{': it is not called as a module' if not calls else ''})"
            )
        head_input, head_output = calls[0]
        return _head_features(head_input, head_output, logits_of(output), len(batch)).float()

    def _train_pass(self, trainer: Trainer, pl_module: LightningModule) -> tuple[torch.Tensor, ...]:
        """Features, labels and dataset indices of the training set, every rank's share gathered (index order)."""
        local: tuple[torch.Tensor, ...] | None = None
        error: Exception | None = None
        try:
            local = self._local_train_pass(trainer, pl_module)
        except Exception as err:  # noqa: BLE001 - reported by _dump; first agreed on by every rank
            error = err
        if world_size() > 1:
            # every rank learns whether all shares are there before any gather: a rank that failed alone must not
            # leave the others waiting in a collective. 2 = the head's input is not per-example (every rank goes
            # idle), 1 = this dump failed.
            code = 2.0 if isinstance(error, _HeadInputError) else 1.0 if error is not None else 0.0
            worst = float(all_reduce_(torch.tensor([code], device=pl_module.device), "max"))
            if worst == 2 and not isinstance(error, _HeadInputError):
                error = _HeadInputError("another process found that the head's input is not one vector per example")
            elif worst == 1 and error is None:
                error = LightningInterpError("another process failed its share of the training-set pass")
        if error is not None or local is None:
            raise error or LightningInterpError("no training features")
        device = pl_module.device
        f, y, i = (all_gather_rows(t.to(device)) for t in local)
        order = i.argsort()
        return f[order].cpu(), y[order].cpu(), i[order].cpu()

    def _local_train_pass(self, trainer: Trainer, pl_module: LightningModule) -> tuple[torch.Tensor, ...]:
        """This rank's share of the training set (:func:`~lightning_interp.examples.sample_batches`: the dataset in
        index order, or a fixed subset of ``max_train_examples``): features, labels, dataset indices."""
        loader = training_loader(trainer)
        if loader is None:
            raise LightningInterpError("the Trainer has no training data")
        dataset = loader.dataset if isinstance(loader, DataLoader) else loader
        if not is_map_style(dataset):
            self.problems.report("iterable_train", "the training data is not a map-style dataset; its loader's own "
                                 "order is used (a shuffling loader makes indices differ between dumps)")  # fmt: skip
        device = pl_module.device
        feats, labels, index = [], [], []
        batches = sample_batches(loader, self.max_train_examples, self.seed, self.batch_size, trainer.global_rank,
                                 world_size(), batch_adapter=self.batch_adapter)  # fmt: skip
        with closing(batches):  # a pass that raises still closes the generator (and its RNG guard) here
            for raw, ids in batches:
                batch = unpack_batch(raw, self.batch_adapter, require_targets=False).to(device)
                feats.append(self._batch_features(pl_module, batch))
                labels.append(_class_labels(batch).to(device))
                index.append(ids.to(device))
        if not feats:
            raise LightningInterpError("this process's share of the training set is empty")
        return torch.cat(feats), torch.cat(labels), torch.cat(index)

    def _example_features(self, pl_module: LightningModule, batch: ModelBatch) -> torch.Tensor:
        """Features of validation examples, ``batch_size`` at a time, on the CPU."""
        parts = []
        for start in range(0, len(batch), self.batch_size):
            part = batch.rows(slice(start, start + self.batch_size)).to(pl_module.device)
            try:
                parts.append(self._batch_features(pl_module, part).cpu())
            except _HeadInputError as err:  # only the training pass's (agreed) verdict makes the monitor idle
                raise LightningInterpError(str(err)) from err
        return torch.cat(parts)

    # ---- the dump ------------------------------------------------------------------------------------------------
    def _dump(self, trainer: Trainer, pl_module: LightningModule, log_scalars: bool) -> None:
        self._last_dump_step = trainer.global_step
        if self.idle is not None or self.head is None:
            return
        started = time.perf_counter()
        modes = [(module, module.training) for module in pl_module.modules()]
        result: dict[str, Any] | None = None
        # the global RNGs come back as they were: a dataset's __getitem__ may draw augmentations from them
        with preserved_rng():
            try:
                pl_module.eval()
                with torch.no_grad():
                    result = self._compute(trainer, pl_module)
            except _HeadInputError as err:  # agreed by every rank: the same on all of them from now on
                self._go_idle("head_input", f"{err}; representer points need one feature vector per example at "
                              "the input of the final linear layer. Pass `layer=` naming the nn.Linear whose input "
                              "is one vector per example (or that gives the returned logits at one position per "
                              "example)")  # fmt: skip
            except Exception as err:  # noqa: BLE001 - a failing dump must never stop training
                self.problems.report(
                    "dump_failed", f"a representer dump failed and was skipped ({type(err).__name__}: {err})"
                )
            finally:
                for module, mode in modes:
                    module.training = mode
                self._captured = []
            seconds = time.perf_counter() - started
            if log_scalars:  # every rank makes the same calls, NaN when the dump failed
                for name in ("stationarity", "decomposition_residual", "agreement"):
                    value = float(result[name]) if result else float("nan")
                    pl_module.log(f"representer/{name}", value, on_step=False, on_epoch=True)
                pl_module.log("representer/dump_seconds", seconds, on_step=False, on_epoch=True, sync_dist=True)
            if result is None:
                return
            self.dumps += 1
            self.last = result
            if trainer.is_global_zero:
                try:
                    self._write(trainer, result)
                except Exception as err:  # noqa: BLE001 - an artifact that cannot be drawn must not stop training
                    self.problems.report("write_failed", f"representer artifacts could not be written "
                                         f"({type(err).__name__}: {err})")  # fmt: skip

    def _compute(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        feats, labels, index = self._train_pass(trainer, pl_module)
        head = self.head
        weight = head.weight.detach().float().cpu()
        bias = head.bias.detach().float().cpu() if head.bias is not None else None
        model_logits = F.linear(feats, weight, bias)
        probs = torch.softmax(model_logits.double(), dim=1)
        fit = fit_representer(feats, probs, lam=self.lam, bias=bias is not None, tol=self.tol,
                              init_weight=weight, init_bias=bias)  # fmt: skip
        agreement = float((fit.logits(feats).argmax(1) == model_logits.argmax(1)).double().mean())
        result: dict[str, Any] = {
            "epoch": self._epoch, "alpha": fit.alpha.float(), "indices": index, "labels": labels,
            "predicted": model_logits.argmax(1), "stationarity": fit.stationarity,
            "decomposition_residual": fit.decomposition_residual, "agreement": agreement,
        }  # fmt: skip
        c = probs.shape[1]
        if bool(((labels >= 0) & (labels < c)).all()):
            ranking = suspect_labels(feats, labels, lam=self.lam, k=min(self.num_suspects, len(labels)))
            result["suspects"] = {"indices": index[ranking.indices], "rows": ranking.indices, "scores": ranking.scores,
                                  "model_loss": -probs[ranking.indices, labels[ranking.indices]].log()}  # fmt: skip
        if self._examples is not None:
            val_feats = self._example_features(pl_module, self._examples)
            top = fit.top_k(val_feats, self.k)
            result["examples"] = {"predicted": fit.logits(val_feats).argmax(1), "targets": self._examples.targets,
                                  **top._asdict()}  # fmt: skip
            pool = self._example_features(pl_module, self._pool)
            sparse = sparse_examples(pool, feats, k=3, num=min(self.num_examples, len(pool)))
            near = nearest_examples(pool[sparse.indices], feats, k=self.k)
            result["sparse"] = {"val_indices": self._pool_index[sparse.indices], "scores": sparse.scores,
                                "neighbors": near.indices}  # fmt: skip
        return result

    # ---- artifacts (rank 0) -----------------------------------------------------------------------------------
    def _write(self, trainer: Trainer, result: dict[str, Any]) -> None:
        directory = log_dir(trainer)
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
            torch.save(result, os.path.join(directory, f"representer_epoch{result['epoch']}.pt"))
        writer = tensorboard_writer(trainer, self.problems)
        if writer is None:
            return
        step = trainer.global_step
        writer.add_histogram("representer/alpha", result["alpha"].flatten().numpy(), step)
        suspects = result.get("suspects")
        if suspects is not None:
            rows = [f"| {r + 1} | {int(suspects['indices'][r])} | {int(result['labels'][suspects['rows'][r]])} | "
                    f"{int(result['predicted'][suspects['rows'][r]])} | {float(suspects['scores'][r]):.4g} | "
                    f"{float(suspects['model_loss'][r]):.3g} |" for r in range(len(suspects["rows"]))]  # fmt: skip
            header = (
                "| rank | train index | given | predicted | alpha at given (label refit) | model loss |\n"
            )
            writer.add_text(
                "representer/suspects", header + "|---|---|---|---|---|---|\n" + "\n".join(rows), step
            )
        examples = result.get("examples")
        if examples is not None:
            shown = self._examples
            if _is_image(shown.inputs) and self._train_example(trainer, 0) is not None:
                add_rgb_image(writer, "representer/examples", self._grid(trainer, examples, result), step)
            else:
                writer.add_text("representer/examples", self._table(trainer, examples, result), step)
            sparse = result["sparse"]
            lines = [f"| {r + 1} | {int(sparse['val_indices'][r])} | {float(sparse['scores'][r]):.3f} | "
                     f"{', '.join(str(int(result['indices'][j])) for j in sparse['neighbors'][r])} |"
                     for r in range(len(sparse["val_indices"]))]  # fmt: skip
            writer.add_text("representer/sparse", "| rank | validation example | mean top-3 cosine | nearest train "
                            "indices |\n|---|---|---|---|\n" + "\n".join(lines), step)  # fmt: skip
        writer.flush()

    def _train_example(self, trainer: Trainer, dataset_index: int) -> ModelBatch | None:
        """One training example as a batch of one (collated by the training loader's ``collate_fn``), or ``None``
        when the training data cannot be indexed."""
        loader = training_loader(trainer)
        dataset = loader.dataset if isinstance(loader, DataLoader) else loader
        if not is_map_style(dataset) or not 0 <= dataset_index < len(dataset):
            return None
        collate = (loader.collate_fn if isinstance(loader, DataLoader) else None) or default_collate
        return unpack_batch(collate([dataset[dataset_index]]), self.batch_adapter, require_targets=False)

    def _cell(self, image: torch.Tensor, caption: str, factor: int) -> np.ndarray:
        picture = upscale(to_rgb(image), factor)
        text = text_image(caption, scale=1)
        canvas = np.full((picture.shape[0] + 8, max(picture.shape[1], text.shape[1]), 3), 255, dtype=np.uint8)
        canvas[: picture.shape[0], : picture.shape[1]] = picture
        canvas[picture.shape[0] + 2 : picture.shape[0] + 7, : text.shape[1]] = text
        return canvas

    def _grid(self, trainer: Trainer, examples: dict[str, Any], result: dict[str, Any]) -> np.ndarray:
        images = self._examples.inputs.float()
        factor = max(1, 48 // max(images.shape[2], images.shape[3]))
        rows = []
        for e in range(images.shape[0]):
            target = "" if examples["targets"] is None else f"Y{_label(examples['targets'], e)} "
            row = [self._cell(images[e], f"{target}P{int(examples['predicted'][e])}", factor)]
            for kind, sign in (("proponent", "+"), ("opponent", "")):
                for j, value in zip(examples[f"{kind}_indices"][e], examples[f"{kind}_values"][e]):
                    item = self._train_example(trainer, int(result["indices"][j]))
                    if item is None:
                        continue
                    row.append(self._cell(item.inputs[0].float(), f"Y{int(result['labels'][j])} {sign}"
                                          f"{float(value):.2g}", factor))  # fmt: skip
            rows.append(row)
        return tile(rows, pad=3)

    def _table(self, trainer: Trainer, examples: dict[str, Any], result: dict[str, Any]) -> str:
        """Markdown: per validation example its label, prediction, proponents and opponents (training index, label,
        representer value); for token inputs also the first real tokens of each (ids where the mask is 1)."""
        shown = self._examples
        tokens = not shown.inputs.is_floating_point() and shown.inputs.dim() == 2

        def described(j: torch.Tensor, value: torch.Tensor) -> str:
            text = f"{int(result['indices'][j])} (y={int(result['labels'][j])}, {float(value):+.3g})"
            if tokens:
                item = self._train_example(trainer, int(result["indices"][j]))
                if item is not None and item.inputs.dim() == 2:
                    text += " " + _token_text(item.inputs[0], item.attention_mask, 0, short=True)
            return text

        lines = []
        for e in range(len(examples["predicted"])):
            label = "-" if examples["targets"] is None else _label(examples["targets"], e)
            cells = [f"| {e} | {label} | {int(examples['predicted'][e])} |"]
            if tokens:
                cells.append(f" {_token_text(shown.inputs[e], shown.attention_mask, e)} |")
            for kind in ("proponent", "opponent"):
                pairs = zip(examples[f"{kind}_indices"][e], examples[f"{kind}_values"][e])
                cells.append(" " + "; ".join(described(j, v) for j, v in pairs) + " |")
            lines.append("".join(cells))
        header = "| example | label | predicted |" + (" tokens |" if tokens else "") + " proponents | opponents |\n"
        rule = "|---|---|---|" + ("---|" if tokens else "") + "---|---|\n"
        return header + rule + "\n".join(lines)

    # ---- state ---------------------------------------------------------------------------------------------------
    @override
    def _state(self) -> dict[str, Any]:
        return {"dumps": self.dumps}

    @override
    def _load_state(self, state: dict[str, Any]) -> None:
        self.dumps = int(state["dumps"])


class _HeadInputError(LightningInterpError):
    """The head's input cannot be made one feature vector per example (a property of the model, not of a batch)."""


def _head_features(
    head_input: torch.Tensor, head_output: torch.Tensor, logits: torch.Tensor | None, batch_size: int
) -> torch.Tensor:
    """One feature vector per example from one call of the final linear layer.

    A head applied to ``(B, D)`` (a pooled output, a CLS token) gives its input. A head applied to every position,
    ``(B, T, D) -> (B, T, C)`` (``GPT2ForSequenceClassification``'s ``score``; any ``(B, ..., D)``), of which the
    model returns one position per example: for each example, the position whose head output equals the model's
    returned logits for that example, value for value, and that position's input. It is the model's own choice
    read back, whatever the padding side or the rule (the last non-pad token, a CLS token); when several positions
    match exactly, the last one.

    Raises:
        LightningInterpError: the input is not per-example (a subclass, ``_HeadInputError``), or the logits are
            non-finite.

    Example:
        >>> head = nn.Linear(3, 2)
        >>> x = torch.randn(2, 4, 3)  # two sequences of four positions
        >>> logits = head(x)[torch.arange(2), torch.tensor([1, 3])]  # the model picks position 1, then 3
        >>> torch.equal(_head_features(x, head(x), logits, 2), x[torch.arange(2), torch.tensor([1, 3])])
        True
    """
    if head_input.dim() < 2 or head_input.shape[0] != batch_size:
        raise _HeadInputError(
            f"the head received an input of shape {tuple(head_input.shape)} for a batch of {batch_size} examples"
        )
    if head_input.dim() == 2:
        return head_input
    width, classes = head_input.shape[-1], head_output.shape[-1]
    inputs = head_input.reshape(batch_size, -1, width)
    outputs = head_output.reshape(batch_size, -1, classes)
    if logits is None or tuple(logits.shape) != (batch_size, classes):
        shape = None if logits is None else tuple(logits.shape)
        raise _HeadInputError(
            f"the head is applied to every position (input {tuple(head_input.shape)}) and the model returns logits "
            f"of shape {shape}, not one row of {classes} per example to find the position by"
        )
    logits = logits.detach().to(outputs.device)
    match = (outputs.double() == logits.double().unsqueeze(1)).all(-1)  # (B, positions)
    found = match.any(1)
    if not bool(found.all()):
        if not bool(torch.isfinite(logits[~found]).all()):
            raise LightningInterpError("the model returned non-finite logits")
        raise _HeadInputError(
            f"the head is applied to every position (input {tuple(head_input.shape)}), and for "
            f"{int((~found).sum())} of {batch_size} examples no position's head output equals the logits the model "
            "returned (the model combines positions, or changes the head's output)"
        )
    position = match.shape[1] - 1 - match.flip(1).to(torch.int8).argmax(1)
    return inputs[torch.arange(batch_size, device=inputs.device), position]


def _class_labels(batch: ModelBatch) -> torch.Tensor:
    """One class index per example, -1 where the batch has none (no targets, or targets that are not one per
    example)."""
    n, targets = len(batch), batch.targets
    if targets is not None and targets.dim() == 1 and targets.shape[0] == n and not targets.is_complex():
        return targets.long()
    return torch.full((n,), -1, dtype=torch.long)


def _label(targets: torch.Tensor, row: int) -> str:
    value = targets[row]
    return str(int(value)) if value.numel() == 1 else "-"


def _token_text(ids: torch.Tensor, mask: torch.Tensor | None, row: int, short: bool = False) -> str:
    """The first real tokens (where the attention mask is 1) of one sequence, as ids."""
    real = ids if mask is None or mask.shape[-1] != ids.shape[-1] else ids[mask[row].bool()]
    limit = 6 if short else 12
    shown = " ".join(str(int(t)) for t in real[:limit])
    return f"`{shown}{' …' if len(real) > limit else ''}` ({len(real)} tokens)"


def _is_image(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.shape[1] in (1, 3) and x.is_floating_point()
