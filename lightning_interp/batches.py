"""Reading a model's inputs and targets out of whatever a dataloader yields, and calling the model on them the way
the user's own ``forward`` receives them."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lightning_interp.errors import LightningInterpError

__all__ = [
    "BatchAdapter",
    "TargetsFn",
    "ModelBatch",
    "unpack_batch",
    "split_batch",
    "call_model",
    "logits_of",
    "INPUT_KEYS",
    "TARGET_KEYS",
]

BatchAdapter = Callable[[Any], "tuple[torch.Tensor, torch.Tensor | None]"]
TargetsFn = Callable[[Any], Any]

#: keys of the model input in a dict batch, in order of preference (Hugging Face names included)
INPUT_KEYS = ("input", "inputs", "x", "image", "images", "input_ids", "pixel_values", "input_values",
              "inputs_embeds", "input_features")  # fmt: skip
#: keys of the targets in a dict batch
TARGET_KEYS = ("target", "targets", "y", "label", "labels")


@dataclass
class ModelBatch:
    """One batch as the model sees it: the input tensor, the other tensors the model's ``forward`` takes
    (``attention_mask``, ``token_type_ids``, ...) and the targets.

    Attributes:
        inputs: the model input, ``(B, ...)``: images, features, token ids.
        targets: class indices or other targets, ``(B, ...)``, or ``None``.
        key: the input's key in a dict batch (``"input_ids"``), ``None`` for tuple batches.
        extras: the dict batch's other tensors (targets excluded), passed to ``forward`` by keyword where it takes
            them (see :func:`call_model`).

    Example:
        >>> batch = ModelBatch(torch.arange(6).view(3, 2), torch.tensor([0, 1, 0]), "input_ids",
        ...                    {"attention_mask": torch.ones(3, 2)})
        >>> picked = batch.rows(torch.tensor([2, 0]))
        >>> picked.inputs.tolist(), picked.targets.tolist(), tuple(picked.extras["attention_mask"].shape)
        ([[4, 5], [0, 1]], [0, 0], (2, 2))
    """

    inputs: torch.Tensor
    targets: torch.Tensor | None = None
    key: str | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def attention_mask(self) -> torch.Tensor | None:
        """``extras["attention_mask"]`` when the batch has one."""
        return self.extras.get("attention_mask")

    def rows(self, index: torch.Tensor | slice) -> ModelBatch:
        """The examples at ``index`` (a slice or an index tensor; repeats allowed) of every per-example tensor."""
        n = len(self)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None or t.dim() == 0 or t.shape[0] != n:
                return t
            return t[index] if isinstance(index, slice) else t[index.to(t.device)]

        return ModelBatch(pick(self.inputs), pick(self.targets), self.key,  # type: ignore[arg-type]
                          {k: pick(v) for k, v in self.extras.items()})  # type: ignore[misc]  # fmt: skip

    def to(self, device: torch.device | str) -> ModelBatch:
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return ModelBatch(move(self.inputs), move(self.targets), self.key, {k: move(v) for k, v in self.extras.items()})

    def detached(self) -> ModelBatch:
        """Detached clones of every tensor (safe to keep across steps, usable by autograd after inference mode)."""
        copy = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
        return ModelBatch(copy(self.inputs), copy(self.targets), self.key, {k: copy(v) for k, v in self.extras.items()})

    def with_inputs(self, inputs: torch.Tensor) -> ModelBatch:
        return replace(self, inputs=inputs)


def _pick_view(inputs: Any, view: int) -> Any:
    """Several augmented views of one batch (a list or tuple of tensors, as self-supervised loaders yield): one."""
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(v, torch.Tensor) for v in inputs):
        if not -len(inputs) <= view < len(inputs):
            raise LightningInterpError(
                f"Expected argument `view` to index the batch's {len(inputs)} input views, but got {view}."
            )
        return inputs[view]
    return inputs


def unpack_batch(
    batch: Any,
    batch_adapter: BatchAdapter | None = None,
    require_targets: bool = True,
    view: int = 0,
    target_key: str | int | None = None,
    targets_fn: TargetsFn | None = None,
) -> ModelBatch:
    """Read a batch: tuples and lists give ``batch[0], batch[1]``; dicts are searched for the input keys
    (:data:`INPUT_KEYS`: ``input``, ``x``, ``image``, ``input_ids``, ``pixel_values``, ...) and target keys
    (:data:`TARGET_KEYS`), their other tensors kept as ``extras``; ``batch_adapter`` overrides all of it.

    Args:
        batch: what the dataloader yielded.
        batch_adapter: optional callable ``batch -> (inputs, targets)``.
        require_targets: raise when no targets can be found (otherwise ``targets`` is ``None``).
        view: when the input is a list of augmented views (self-supervised training), which one to take.
        target_key: take the targets from ``batch[target_key]`` instead (labels that ride along with unlabeled
            views).
        targets_fn: take the targets from ``targets_fn(batch)`` instead.

    Raises:
        LightningInterpError: the batch format is not understood; the message names ``batch_adapter``.

    Example:
        >>> batch = unpack_batch({"input_ids": torch.ones(2, 5, dtype=torch.long),
        ...                       "attention_mask": torch.ones(2, 5), "labels": torch.tensor([0, 1])})
        >>> batch.key, tuple(batch.inputs.shape), sorted(batch.extras), batch.targets.tolist()
        ('input_ids', (2, 5), ['attention_mask'], [0, 1])
        >>> views = unpack_batch(([torch.zeros(2, 3), torch.ones(2, 3)], torch.tensor([4, 5])), view=1)
        >>> views.inputs.sum().item(), views.targets.tolist()
        (6.0, [4, 5])
    """
    key: str | None = None
    extras: dict[str, torch.Tensor] = {}
    if batch_adapter is not None:
        out = batch_adapter(batch)
        if not (isinstance(out, Sequence) and len(out) == 2):
            raise LightningInterpError(
                f"Expected `batch_adapter` to return a pair (inputs, targets), but got {type(out).__name__}."
            )
        inputs, targets = out
    elif isinstance(batch, torch.Tensor):
        inputs, targets = batch, None
    elif isinstance(batch, Mapping):
        key = next((k for k in INPUT_KEYS if k in batch), None)
        inputs = batch[key] if key is not None else None
        target_name = next((k for k in TARGET_KEYS if k in batch), None)
        targets = batch[target_name] if target_name is not None else None
        extras = {
            k: v for k, v in batch.items()
            if isinstance(v, torch.Tensor) and k != key and k not in TARGET_KEYS and k != target_key
        }  # fmt: skip
    elif isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 1:
        inputs = batch[0]
        targets = batch[1] if len(batch) >= 2 else None
    else:
        inputs, targets = None, None
    inputs = _pick_view(inputs, view)
    if targets_fn is not None:
        targets = targets_fn(batch)
    elif target_key is not None:
        try:
            targets = batch[target_key]
        except (KeyError, IndexError, TypeError) as err:
            raise LightningInterpError(
                f"Expected argument `target_key` to name an entry of the batch, but {target_key!r} is not in a "
                f"batch of type {type(batch).__name__}{_keys_hint(batch)}."
            ) from err
    if not isinstance(inputs, torch.Tensor):
        raise LightningInterpError(
            f"Could not find an input tensor in a batch of type {type(batch).__name__}"
            f"{_keys_hint(batch)}. Expected a (inputs, targets) pair or a dict with one of the keys "
            f"{list(INPUT_KEYS)}; pass `batch_adapter=lambda batch: (inputs, targets)` to the callback."
        )
    if targets is not None and not isinstance(targets, torch.Tensor):
        targets = torch.as_tensor(targets)
    if targets is None and require_targets:
        raise LightningInterpError(
            f"Could not find targets in a batch of type {type(batch).__name__}{_keys_hint(batch)}. "
            f"Expected a (inputs, targets) pair or a dict with one of the keys {list(TARGET_KEYS)}; "
            "pass `batch_adapter=lambda batch: (inputs, targets)` (or `target_key=`/`targets_fn=`) to the callback."
        )
    return ModelBatch(inputs, targets, key, extras)


def split_batch(
    batch: Any, batch_adapter: BatchAdapter | None = None, require_targets: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(inputs, targets)`` of a batch (:func:`unpack_batch` without the extras).

    Example:
        >>> x, y = split_batch({"image": torch.zeros(2, 3), "label": torch.tensor([0, 1])})
        >>> tuple(x.shape), y.tolist()
        ((2, 3), [0, 1])
    """
    unpacked = unpack_batch(batch, batch_adapter, require_targets)
    return unpacked.inputs, unpacked.targets


def _keys_hint(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f" with keys {list(batch.keys())}"
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return f" of length {len(batch)}"
    return ""


def _forward_parameters(model: Callable[..., Any]) -> tuple[set[str], bool]:
    """Names ``forward`` takes by keyword, and whether it has ``**kwargs``."""
    target = model.forward if isinstance(model, nn.Module) else model
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # builtins, some C extensions
        return set(), False
    kinds = inspect.Parameter
    named = {p.name for p in parameters if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
    return named, any(p.kind == kinds.VAR_KEYWORD for p in parameters)


def call_model(model: Callable[..., Any], batch: ModelBatch, inputs: torch.Tensor | None = None) -> Any:
    """Call ``model`` on ``batch`` (its input replaced by ``inputs`` when given) the way its ``forward`` takes it:

    * a tuple batch (or one read by a ``batch_adapter``): ``model(inputs)``;
    * a dict batch whose input key ``forward`` names (``forward(self, input_ids, attention_mask=None)``, a Hugging
      Face model) or a ``forward(self, **batch)``: ``model(input_ids=..., attention_mask=..., ...)``, with every
      extra tensor of the batch that ``forward`` names (all of them for a bare ``**kwargs``); the targets are never
      passed (a Hugging Face model would compute its loss);
    * otherwise (``forward(self, x, attention_mask=None)``): ``model(inputs, <the extras forward names>)``.

    Returns what the model returns (see :func:`logits_of`).

    Example:
        >>> class Classifier(nn.Module):
        ...     def forward(self, input_ids, attention_mask=None):
        ...         return (input_ids * attention_mask).sum(1, keepdim=True).float()
        >>> batch = ModelBatch(torch.tensor([[1, 2, 3]]), None, "input_ids", {"attention_mask": torch.tensor([[1, 1, 0]]),
        ...                    "special_tokens_mask": torch.zeros(1, 3)})
        >>> call_model(Classifier(), batch).tolist()
        [[3.0]]
    """
    x = batch.inputs if inputs is None else inputs
    if batch.key is None and not batch.extras:
        return model(x)
    named, var_keyword = _forward_parameters(model)
    bare_kwargs = var_keyword and not named
    extras = {k: v for k, v in batch.extras.items() if k in named or bare_kwargs}
    if batch.key is not None and (batch.key in named or bare_kwargs):
        return model(**{batch.key: x}, **extras)
    return model(x, **extras)


def logits_of(output: Any) -> torch.Tensor | None:
    """The scores in what a model returned: a tensor, ``output.logits`` / ``output["logits"]`` (Hugging Face
    ``ModelOutput``), or the first tensor of a tuple, list or dict; ``None`` when there is none.

    Example:
        >>> logits_of({"loss": torch.tensor(1.0), "logits": torch.zeros(2, 3)}).shape
        torch.Size([2, 3])
        >>> logits_of((torch.ones(2, 4), "cache")).shape, logits_of("text") is None
        (torch.Size([2, 4]), True)
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        output = list(output.values())
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)):
        return next((item for item in output if isinstance(item, torch.Tensor)), None)
    return None
