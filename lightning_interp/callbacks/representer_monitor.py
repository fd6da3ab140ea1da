"""RepresenterMonitor: which training examples support and oppose the predictions, refit every few epochs."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data._utils.collate import default_collate
from typing_extensions import override

from lightning_interp._distributed import all_gather_rows, all_reduce_, world_size
from lightning_interp._validation import check_optional_positive_int, check_positive_float, check_positive_int
from lightning_interp.attribution.representer import fit_representer, suspect_labels
from lightning_interp.attribution.similarity import nearest_examples, sparse_examples
from lightning_interp.batches import BatchAdapter, split_batch
from lightning_interp.callbacks._base import PeriodicDumpCallback
from lightning_interp.errors import LightningInterpError
from lightning_interp.examples import example_source, first_loader, select_examples
from lightning_interp.layers import last_linear, named_submodules
from lightning_interp.render import tile, to_rgb, upscale
from lightning_interp.saliency_render import text_image
from lightning_interp.tensorboard import log_dir, tensorboard_writer

__all__ = ["RepresenterMonitor"]


class RepresenterMonitor(PeriodicDumpCallback):
    """Representer points (Yeh et al. 2018) during ``fit``: the training examples that support (proponents) and
    oppose (opponents) the predictions on fixed validation examples, training labels that look wrong, and
    validation examples the training data barely supports.

    Every ``every_n_epochs`` epochs and at the end of fit, in eval mode and without gradients: the inputs of the
    final ``nn.Linear`` (``layer``) are captured for the training set through the monitor's own non-shuffled pass
    over the training dataset (a fixed subset of ``max_train_examples`` if set; under DDP each rank takes a shard
    and the features are gathered), the head is refit exactly by
    :func:`~lightning_interp.attribution.fit_representer` to its own softmax outputs, and the fixed validation
    examples (:func:`~lightning_interp.examples.select_examples`, as SaliencyMonitor) are explained.

    Logged through ``LightningModule.log`` (any logger, every rank): ``representer/stationarity`` (max |grad| of the
    refit), ``representer/decomposition_residual`` (relative error of ``z = sum_i alpha_i (f_i . f + 1)``),
    ``representer/agreement`` (fraction of training points where refit and model predict the same class) and
    ``representer/dump_seconds``.

    With a TensorBoardLogger (rank 0): histogram ``representer/alpha``; image ``representer/examples`` (per row a
    validation example, then its top proponents and opponents, captioned with label and value) or, for non-image
    inputs, text ``representer/examples``; text ``representer/suspects`` (training labels ranked by
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
        max_train_examples: refit on a fixed random subset of this many training examples (all when ``None``).
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
        max_train_examples: int | None = None,
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
        self._captured: list[torch.Tensor] = []
        self._capturing = False
        self._examples: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._pool: torch.Tensor | None = None
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
        if self.layer is None:
            found = last_linear(pl_module)
            if found is None:
                raise LightningInterpError(
                    "RepresenterMonitor explains the final nn.Linear layer, but the model has none. Pass `layer=` "
                    "naming the model's final linear layer, or leave RepresenterMonitor out for this model."
                )
            self.head = found.module  # type: ignore[assignment]
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
        self.head = modules[self.layer]  # type: ignore[assignment]

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # registered here, not in setup: callbacks such as weight averaging deep-copy the model in their setup
        self.hooks.forward(self.head, self._hook)
        source, _ = example_source(trainer, fall_back_to_training=False)
        self._examples = self._pool = None
        if source is not None:
            inputs, targets, _ = select_examples(source, self.num_examples, self.seed, self.batch_adapter)
            self._examples = (inputs, targets)
            self._pool, _, self._pool_index = select_examples(
                source, self.sparse_pool, self.seed, self.batch_adapter
            )
        else:
            self.problems.report("no_val_data", "no validation data; only suspect labels and alpha are shown")

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._capturing and args and isinstance(args[0], torch.Tensor):
            self._captured.append(args[0].detach())

    # ---- when ----------------------------------------------------------------------------------------------------
    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch = trainer.current_epoch  # at on_train_end the Trainer has already counted one epoch more

    # ---- the dump ------------------------------------------------------------------------------------------------
    def _features(self, pl_module: LightningModule, inputs: torch.Tensor) -> torch.Tensor:
        self._captured = []
        self._capturing = True
        try:
            pl_module(inputs.to(pl_module.device))
        finally:
            self._capturing = False
        if (
            len(self._captured) != 1
            or self._captured[0].dim() != 2
            or self._captured[0].shape[0] != inputs.shape[0]
        ):
            shapes = [tuple(t.shape) for t in self._captured]
            raise LightningInterpError(
                f"the head received inputs of shapes {shapes} for a batch of {inputs.shape[0]}"
            )
        return self._captured.pop().float()

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
            # leave the others waiting in a collective
            ok = all_reduce_(torch.tensor([0.0 if error else 1.0], device=pl_module.device), "min")
            if error is None and float(ok) < 1:
                error = LightningInterpError("another process failed its share of the training-set pass")
        if error is not None or local is None:
            raise error or LightningInterpError("no training features")
        device = pl_module.device
        f, y, i = (all_gather_rows(t.to(device)) for t in local)
        order = i.argsort()
        return f[order].cpu(), y[order].cpu(), i[order].cpu()

    def _local_train_pass(self, trainer: Trainer, pl_module: LightningModule) -> tuple[torch.Tensor, ...]:
        """This rank's share of the training set: features, labels, dataset indices."""
        loader = first_loader(trainer.train_dataloader)
        if loader is None and trainer.datamodule is not None:
            loader = trainer.datamodule.train_dataloader()
        dataset = loader.dataset if isinstance(loader, DataLoader) else None
        feats, labels, index = [], [], []
        if dataset is not None and not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__"):
            # our own pass over the dataset in index order: no sampler, no shuffling, no RNG, no workers
            n = len(dataset)
            chosen = torch.arange(n)
            if self.max_train_examples is not None and self.max_train_examples < n:
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
                chosen = perm[: self.max_train_examples].sort().values
            rank, size = trainer.global_rank, world_size()
            chosen = chosen[rank::size]
            collate = loader.collate_fn or default_collate
            for start in range(0, len(chosen), self.batch_size):
                ids = chosen[start : start + self.batch_size]
                x, y = split_batch(
                    collate([dataset[int(i)] for i in ids]), self.batch_adapter, require_targets=False
                )
                feats.append(self._features(pl_module, x))
                labels.append(y if y is not None else torch.full((len(ids),), -1))
                index.append(ids)
        else:
            self.problems.report("iterable_train", "the training data is not a map-style dataset; its loader's own "
                                 "order is used (a shuffling loader makes indices differ between dumps)")  # fmt: skip
            seen = 0
            for x, y in (split_batch(b, self.batch_adapter, require_targets=False) for b in loader):
                feats.append(self._features(pl_module, x))
                labels.append(y if y is not None else torch.full((x.shape[0],), -1))
                index.append(torch.arange(seen, seen + x.shape[0]))
                seen += x.shape[0]
                if self.max_train_examples is not None and seen >= self.max_train_examples:
                    break
        if not feats:
            raise LightningInterpError("this process's share of the training set is empty")
        return torch.cat(feats), torch.cat(labels).long().reshape(-1), torch.cat(index)

    def _dump(self, trainer: Trainer, pl_module: LightningModule, log_scalars: bool) -> None:
        self._last_dump_step = trainer.global_step
        started = time.perf_counter()
        modes = [(module, module.training) for module in pl_module.modules()]
        result: dict[str, Any] | None = None
        try:
            pl_module.eval()
            with torch.no_grad():
                result = self._compute(trainer, pl_module)
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
            self._write(trainer, result)

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
            x, y = self._examples
            val_feats = self._features(pl_module, x).cpu()
            top = fit.top_k(val_feats, self.k)
            result["examples"] = {"predicted": fit.logits(val_feats).argmax(1), "targets": y, **top._asdict()}
            pool = torch.cat([self._features(pl_module, p).cpu() for p in self._pool.split(self.batch_size)])
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
            dataset = self._train_dataset(trainer)
            images = self._examples[0]
            if _is_image(images) and dataset is not None:
                writer.add_image("representer/examples", self._grid(images, examples, result, dataset), step,
                                 dataformats="HWC")  # fmt: skip
            else:
                writer.add_text("representer/examples", self._table(examples, result), step)
            sparse = result["sparse"]
            lines = [f"| {r + 1} | {int(sparse['val_indices'][r])} | {float(sparse['scores'][r]):.3f} | "
                     f"{', '.join(str(int(result['indices'][j])) for j in sparse['neighbors'][r])} |"
                     for r in range(len(sparse["val_indices"]))]  # fmt: skip
            writer.add_text("representer/sparse", "| rank | validation example | mean top-3 cosine | nearest train "
                            "indices |\n|---|---|---|---|\n" + "\n".join(lines), step)  # fmt: skip
        writer.flush()

    def _train_dataset(self, trainer: Trainer) -> Any:
        loader = first_loader(trainer.train_dataloader)
        dataset = loader.dataset if isinstance(loader, DataLoader) else None
        return None if dataset is None or isinstance(dataset, IterableDataset) else dataset

    def _cell(self, image: torch.Tensor, caption: str, factor: int) -> np.ndarray:
        picture = upscale(to_rgb(image), factor)
        text = text_image(caption, scale=1)
        canvas = np.full((picture.shape[0] + 8, max(picture.shape[1], text.shape[1]), 3), 255, dtype=np.uint8)
        canvas[: picture.shape[0], : picture.shape[1]] = picture
        canvas[picture.shape[0] + 2 : picture.shape[0] + 7, : text.shape[1]] = text
        return canvas

    def _grid(
        self, images: torch.Tensor, examples: dict[str, Any], result: dict[str, Any], dataset: Any
    ) -> np.ndarray:
        factor = max(1, 48 // max(images.shape[2], images.shape[3]))
        rows = []
        for e in range(images.shape[0]):
            target = "" if examples["targets"] is None else f"Y{int(examples['targets'][e])} "
            row = [self._cell(images[e], f"{target}P{int(examples['predicted'][e])}", factor)]
            for kind, sign in (("proponent", "+"), ("opponent", "")):
                for j, value in zip(examples[f"{kind}_indices"][e], examples[f"{kind}_values"][e]):
                    x, _ = split_batch(default_collate([dataset[int(result["indices"][j])]]), self.batch_adapter,
                                       require_targets=False)  # fmt: skip
                    row.append(
                        self._cell(x[0], f"Y{int(result['labels'][j])} {sign}{float(value):.2g}", factor)
                    )
            rows.append(row)
        return tile(rows, pad=3)

    def _table(self, examples: dict[str, Any], result: dict[str, Any]) -> str:
        lines = []
        for e in range(len(examples["predicted"])):
            cells = [f"{int(result['indices'][j])} (y={int(result['labels'][j])}, {float(v):+.3g})"
                     for kind in ("proponent", "opponent")
                     for j, v in zip(examples[f"{kind}_indices"][e], examples[f"{kind}_values"][e])]  # fmt: skip
            lines.append(f"| {e} | {int(examples['predicted'][e])} | " + ", ".join(cells[: self.k]) + " | "
                         + ", ".join(cells[self.k :]) + " |")  # fmt: skip
        return "| example | predicted | proponents | opponents |\n|---|---|---|---|\n" + "\n".join(lines)

    # ---- state ---------------------------------------------------------------------------------------------------
    @override
    def _state(self) -> dict[str, Any]:
        return {"dumps": self.dumps}

    @override
    def _load_state(self, state: dict[str, Any]) -> None:
        self.dumps = int(state["dumps"])


def _is_image(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.shape[1] in (1, 3)
