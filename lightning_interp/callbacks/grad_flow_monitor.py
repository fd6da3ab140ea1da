"""GradFlowMonitor: how the gradient's norm changes from layer to layer, measured and predicted from the
weights."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from lightning import LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lightning_interp._validation import check_module_types, check_positive_float, check_positive_int
from lightning_interp.callbacks._base import InterpCallback
from lightning_interp.callbacks.norm_stats_monitor import logged_step
from lightning_interp.charts import gradient_flow_chart
from lightning_interp.errors import LightningInterpError
from lightning_interp.layers import (
    Layer,
    called_functionally,
    first_tensor,
    is_normalization,
    named_submodules,
    never_ran_message,
    residual_blocks,
    select_layers,
)
from lightning_interp.stats.grad_flow import (
    ChainLink,
    PowerIteration,
    analytic_flow,
    chain_links,
    measured_flow,
    module_param_grad_norms,
    param_grad_norms,
    per_example_grad_norm,
    weight_matrix,
)
from lightning_interp.stats.norm_stats import FIT_TOLERANCE, effective_gain, is_feature_norm
from lightning_interp.tensorboard import add_custom_scalar_charts, add_rgb_image, tensorboard_writer

__all__ = ["GradFlowMonitor"]

OUTPUT = "output"


def _norms_on_stream(
    model: nn.Module, watched: Sequence[str], output_layer: str | None, extra_types: Sequence[type]
) -> list[Layer]:
    """The feature normalizations (LayerNorm, RMSNorm and library classes like them) a residual stream's gradient
    meets: those inside a watched module (a block, the stem) and those registered after the last watched module but
    not inside the output layer (a final norm). BatchNorm and GroupNorm inside ResNet blocks are left to
    NormStatsMonitor: their sigma costs passes over whole conv maps (measured: 0.7 s of a logged ResNet-18 step)."""
    named = named_submodules(model)
    position = {n: i for i, (n, _) in enumerate(named)}
    last = max(position[n] for n in watched)
    last_name = named[last][0]
    found = []
    for name, module in named:
        if not (is_normalization(module, extra_types) and is_feature_norm(module)):
            continue
        inside = any(name.startswith(w + ".") for w in watched)
        after = position[name] > last and not name.startswith(last_name + ".")
        in_head = output_layer is not None and name.startswith(output_layer + ".")
        if inside or (after and not in_head):
            found.append(Layer(name, module))
    return found


class GradFlowMonitor(InterpCallback):
    """Per-layer gradient norms, backward gains and their cumulative product, next to the product the weights
    and normalization gains predict (plain chains), logged every ``log_every_n_steps``.

    On logged steps only, forward hooks on the hidden layers (and the output layer) put gradient hooks on
    their outputs, which fire during the training step's *own* backward: no extra forward or backward pass.
    Parameter gradients are read in ``on_before_optimizer_step``. On other steps each hook checks a flag and
    returns. Definitions: :mod:`lightning_interp.stats.grad_flow`.

    The default hidden layers follow the model's structure (:func:`~lightning_interp.layers.select_layers`): on a
    model with repeated blocks (transformer layers, ResNet blocks) the residual stream — the output of the module
    feeding the first block (the embeddings) and of every block (the first tensor of a tuple or ``ModelOutput``;
    a ``(B, T, D)`` sequence gives one norm per example over its ``T * D`` values) — otherwise every
    nonlinearity's output.

    Logged through ``LightningModule.log`` (``on_step``, ``sync_dist=True``, any logger):

    * ``gradflow/<hidden layer>/grad_norm``: mean per-example ``||dL/dH_l||``;
      ``gradflow/<hidden layer>/backward_gain``: ``||dL/dH_{l-1}|| / ||dL/dH_l||`` (not for the first layer);
      ``gradflow/<hidden layer>/cum_product``: product of the gains from the output down to ``l``;
    * ``gradflow/output/grad_norm``, ``gradflow/output/backward_gain``, for the output of the last weight layer
      (the logits; a Hugging Face head such as ``classifier`` or ``score``);
    * ``gradflow/<norm layer>/effective_gain``: ``mean(|g| / sigma)`` of each normalization layer followed
      (eq. 1.10's ``g_l / sigma_l``, with the sigma the layer divides by on this forward: per token for
      LayerNorm, the root mean square for RMSNorm and RMSNorm-like library classes; see
      :func:`~lightning_interp.stats.norm_stats.effective_gain`);
    * ``gradflow/total/param_grad_norm``: norm of the gradients of all parameters;
    * ``gradflow/total/cum_product``: the product at the first watched layer (output to input end);

    On a plain chain (no repeated blocks):

    * ``gradflow/<hidden layer>/analytic_gain``: ``||W_l||_2 * mean(|g_l| / sigma_l)`` (the weight layer and
      normalization feeding the layer, :func:`~lightning_interp.stats.grad_flow.chain_links`);
      ``gradflow/<hidden layer>/analytic_cum_product``: its product from the output down to ``l``;
      ``gradflow/output/analytic_gain`` (``||W_out||_2``); ``gradflow/total/analytic_cum_product``;
    * ``gradflow/<weight layer>/spectral_norm``: ``||W||_2`` by persistent power iteration (one step per
      logged step; a conv kernel as its ``(out, in*k*k)`` matrix, a Hugging Face ``Conv1D`` transposed);
    * ``gradflow/<module>/param_grad_norm``: norm of the gradients of each module's own parameters (weight and
      bias together); the normalizations followed are those of the chain links.

    On a model with repeated blocks, instead:

    * ``gradflow/<block or stem>/param_grad_norm``: norm of the gradients of every parameter inside it
      (recursive: attention, MLP and norms together; Xiong et al. 2020's per-layer quantity), and
      ``gradflow/<output layer>/param_grad_norm``;
    * ``gradflow/<output layer>/spectral_norm``;
    * effective gains of every LayerNorm/RMSNorm (and library classes like them) inside a watched block or the
      stem, and of those after the last block (GPT-2's ``ln_f``, ViT's ``layernorm``, a Pre-LN encoder's final
      norm); a ResNet's BatchNorm gains are NormStatsMonitor's ``norm/<layer>/effective_gain`` (their batch
      statistics cost passes over whole conv maps);
    * no ``analytic_*`` tags: a block computes ``h + F(h)``, whose Jacobian ``I + dF/dh`` has an identity
      path that is in no weight, so the chain's ``prod ||W|| g / sigma`` predicts nothing across blocks.

    And in both cases:
    * ``gradflow/total/flow_events``: logged steps whose ``total/cum_product`` left ``band`` (vanishing below,
      exploding above; warned once each); ``gradflow/total/nonfinite_events``: steps with NaN/Inf gradients.

    With a TensorBoardLogger, every ``every_n_epochs`` on global rank 0: the image ``gradflow/figure``
    (per-layer gradient norm on a log scale, and measured vs analytic cumulative products, drawn by
    :func:`lightning_interp.charts.gradient_flow_chart` without matplotlib), and once a custom-scalars layout
    (``gradflow`` section: one chart per statistic).

    Mixed precision: with a gradient scaler (``precision="16-mixed"``) the activation gradients seen by the
    hooks are scaled; they are divided by the scaler's scale read in ``on_before_optimizer_step`` (the scale
    used for that backward). Parameter gradients are already unscaled by Lightning before that hook.

    A layer whose hook never runs (``nn.MultiheadAttention`` applies its ``out_proj`` functionally) or whose
    output carries no gradient is named in a warning once and left out. At the defaults, a model with nothing
    to watch gets one warning naming ``layers=`` and an idle callback; explicit ``layers`` that select no module
    fail in ``setup``.

    Args:
        layers: the hidden layers (see :func:`~lightning_interp.layers.select_layers`); ``None``: the residual
            stream of a model with repeated blocks, else every nonlinearity's output. ``"input"`` is ignored.
        norm_types: extra module types to treat as normalization layers.
        every_n_epochs: figure period in training epochs.
        band: ``(low, high)`` for ``total/cum_product``; outside it a vanishing/exploding event is counted.
        output_key: key or index of the tensor to use when a layer returns a tuple or dict.
        seed: seed of the power iteration's start vectors.

    Example:
        >>> from lightning import Trainer
        >>> from lightning_interp.data import DigitsDataModule
        >>> from lightning_interp.models import DeepMLP
        >>> monitor = GradFlowMonitor()
        >>> trainer = Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, log_every_n_steps=1,
        ...                   callbacks=[monitor], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(DeepMLP(depth=16, norm="none"), DigitsDataModule())  # doctest: +ELLIPSIS
        >>> monitor.last["gradflow/total/cum_product"] < 1e-3  # 16 tanh layers, no normalization: vanishing
        True
    """

    STATE_VERSION = 1
    WHERE_TO_LOOK = "Custom Scalars, section `gradflow`; Images `gradflow/figure`; `gradflow/total/cum_product` for vanishing/exploding"

    def __init__(
        self,
        layers: str | Sequence[str | type | Callable[..., bool]] | None = None,
        norm_types: Sequence[type] = (),
        every_n_epochs: int = 1,
        band: tuple[float, float] = (1e-4, 1e4),
        output_key: str | int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.layers = layers
        self.norm_types = check_module_types("norm_types", norm_types)
        self.every_n_epochs = check_positive_int("every_n_epochs", every_n_epochs)
        if not (isinstance(band, (tuple, list)) and len(band) == 2):
            raise LightningInterpError(
                f"Expected argument `band` to be a pair (low, high), but got {band!r}."
            )
        low, high = check_positive_float("band[0]", band[0]), check_positive_float("band[1]", band[1])
        if not low < high:
            raise LightningInterpError(f"Expected argument `band` to have low < high, but got {band!r}.")
        self.band = (low, high)
        self.output_key = output_key
        self.seed = seed
        self.hidden_layers: list[Layer] = []
        self.links: list[ChainLink] = []
        self.output_layer: str | None = None
        self.residual = False  # the model has repeated blocks: no analytic chain
        self.norm_layers: list[Layer] = []
        self.param_groups: list[str] = []
        self.power = PowerIteration(seed)
        self.last: dict[str, float] = {}
        self.flow_events = 0
        self.nonfinite_events = 0
        self._modules: dict[str, nn.Module] = {}
        self._active = False
        self._order: list[str] = []
        self._grad_norms: dict[str, torch.Tensor] = {}
        self._gains: dict[str, torch.Tensor] = {}
        self._fits: dict[str, torch.Tensor] = {}
        self._param_norms: dict[str, torch.Tensor] = {}
        self._scale = 1.0
        self._fired: set[str] = set()
        self._no_grad: set[str] = set()
        self._functional: dict[str, str] = {}

    @override
    def _config(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "norm_types": [t.__name__ for t in self.norm_types],
            "every_n_epochs": self.every_n_epochs,
            "band": self.band,
            "seed": self.seed,
        }

    # ---- set-up
    # ----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._refuse_sharded(trainer, "its spectral norms and parameter-gradient norms read whole weight matrices")
        self.idle = None
        self.hidden_layers = [layer for layer in select_layers(pl_module, self.layers) if not layer.is_input]
        if not self.hidden_layers:
            if self.layers is not None:
                raise LightningInterpError(
                    "Expected argument `layers` to select at least one module whose output GradFlowMonitor can "
                    f"follow (the model input `input` is not one), but got {self.layers!r}."
                )
            self._go_idle(
                "nothing_to_watch",
                "found no hidden layer to watch (no repeated blocks, no nonlinearity module, fewer than two weight "
                "layers); pass `layers=` naming the modules whose outputs to follow (names, globs such as "
                "'encoder.layer.*', or module types)",
            )
            return
        names = [layer.name for layer in self.hidden_layers]
        self._modules = dict(named_submodules(pl_module))
        self._functional = called_functionally(pl_module)
        self.residual = bool(residual_blocks(pl_module))
        links, self.output_layer = chain_links(pl_module, names, self.norm_types)
        if self.residual:
            self.links = []
            self.norm_layers = _norms_on_stream(pl_module, names, self.output_layer, self.norm_types)
            groups = [*names, *([self.output_layer] if self.output_layer is not None else [])]
            self.param_groups = [n for n in groups if next(self._modules[n].parameters(), None) is not None]
        else:
            self.links = links
            linked = {link.norm for link in links if link.norm is not None}
            self.norm_layers = [Layer(n, m) for n, m in named_submodules(pl_module) if n in linked]
            self.param_groups = []

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # registered here, not in setup: callbacks such as weight averaging deep-copy the model in their setup
        self._release()
        if self.idle:
            return
        for layer in self.hidden_layers:
            self.hooks.forward(layer.module, self._make_output_hook(layer.name))
        if self.output_layer is not None:
            self.hooks.forward(self._modules[self.output_layer], self._make_output_hook(OUTPUT))
        for layer in self.norm_layers:
            self.hooks.forward(layer.module, self._make_norm_hook(layer.name))
        writer = tensorboard_writer(trainer, self.problems)
        if writer is not None:
            stats = ["grad_norm", "backward_gain", "cum_product", "effective_gain"]
            if not self.residual:
                stats += ["analytic_gain", "analytic_cum_product"]
            stats += ["spectral_norm", "param_grad_norm"]
            charts = {f"{stat}, every layer": [rf"gradflow/.*/{stat}$"] for stat in stats}
            if self.residual:
                charts["total cumulative product"] = [r"gradflow/total/cum_product$"]
            else:
                charts["total cumulative product, measured vs analytic"] = [
                    r"gradflow/total/(analytic_)?cum_product$"
                ]
            add_custom_scalar_charts(writer, "gradflow", charts)

    # ---- hooks
    # -----------------------------------------------------------------------------------------------
    def _make_output_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self._active or name in self._grad_norms or name in self._order:
                return  # a shared module: the first call site is followed
            self._fired.add(name)
            y = first_tensor(output, self.output_key)
            if y is None or not y.requires_grad:
                self._no_grad.add(name)
                return
            self._order.append(name)
            self.hooks.tensor(y, self._make_grad_hook(name))

        return hook

    def _make_grad_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                # a NaN/Inf anywhere in the gradient makes its norm NaN/Inf: checked on the norms, no extra
                # pass
                self._grad_norms[name] = per_example_grad_norm(grad)

        return hook

    def _make_norm_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self._active and name not in self._gains and args and isinstance(args[0], torch.Tensor):
                diagnostics: dict[str, torch.Tensor] = {}
                with torch.no_grad():
                    y = first_tensor(output)
                    self._gains[name] = effective_gain(module, args[0], output=y, diagnostics=diagnostics)
                if "fit_error" in diagnostics:
                    self._fits[name] = diagnostics["fit_error"]

        return hook

    # ---- batches
    # ---------------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._active = not self.idle and logged_step(trainer)
        self._order, self._grad_norms, self._gains, self._fits = [], {}, {}, {}
        self._param_norms, self._scale = {}, 1.0

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if not self._active:
            return
        if self.residual:
            self._param_norms = module_param_grad_norms(pl_module, self.param_groups)
        else:
            self._param_norms = param_grad_norms(pl_module)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            self._scale = float(scaler.get_scale())

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        self._active = False
        self._check_fired()
        values = self._collect()
        if values is None:
            return
        logged = self._flow(values)
        for tag, value in logged.items():
            pl_module.log(tag, value, on_step=True, on_epoch=False, sync_dist=True)
        self.last = logged

    def _collect(self) -> dict[str, float] | None:
        """Every tensor of the step, moved to the host in one transfer."""
        tensors: dict[str, torch.Tensor] = {}
        for name, norm in self._grad_norms.items():
            tensors[f"norm:{name}"] = norm
        for name, gain in self._gains.items():
            tensors[f"gain:{name}"] = gain
        for name, fit in self._fits.items():
            tensors[f"fit:{name}"] = fit
        for name, norm in self._param_norms.items():
            tensors[f"param:{name}"] = norm
        weights = [link.weight for link in self.links if link.weight is not None]
        if self.output_layer is not None:
            weights.append(self.output_layer)
        for name in dict.fromkeys(weights):
            tensors[f"spectral:{name}"] = self.power.step(name, weight_matrix(self._modules[name]))
        if not tensors:
            return None
        device = next(iter(tensors.values())).device
        numbers = torch.stack([t.reshape(()).float().to(device) for t in tensors.values()]).tolist()
        self._grad_norms, self._gains, self._fits, self._param_norms = {}, {}, {}, {}
        return dict(zip(tensors, numbers))

    def _check_fired(self) -> None:
        """Name, once, the watched layers of this logged step that gave no gradient to follow."""
        watched = [layer.name for layer in self.hidden_layers]
        silent = [name for name in watched if name not in self._fired]
        if silent:
            self.problems.report(
                "never_fired", never_ran_message(silent, self._functional) + "; no gradient is followed there"
            )
        frozen = [name for name in watched if name in self._no_grad and name not in self._order]
        if frozen:
            self.problems.report(
                "no_gradient",
                f"the outputs of {', '.join(f'`{n}`' for n in frozen)} carry no gradient (frozen or detached); "
                "no gradient is followed there",
            )
        self._fired, self._no_grad = set(), set()

    def _flow(self, values: dict[str, float]) -> dict[str, float]:
        scale = self._scale
        logged: dict[str, float] = {}
        hidden = [name for name in self._order if name != OUTPUT and f"norm:{name}" in values]
        norms = [values[f"norm:{name}"] / scale for name in hidden]
        output_norm = values[f"norm:{OUTPUT}"] / scale if f"norm:{OUTPUT}" in values else None
        if not all(math.isfinite(values[f"norm:{name}"]) for name in self._order if f"norm:{name}" in values):
            self.nonfinite_events += 1
            self.problems.report(
                "nonfinite_gradients", "activation gradients held NaN/Inf; logged as they are"
            )
        for name, norm in zip(hidden, norms):
            logged[f"gradflow/{name}/grad_norm"] = norm
        if output_norm is not None:
            logged[f"gradflow/{OUTPUT}/grad_norm"] = output_norm
        for name, entry in measured_flow(hidden, norms, output_norm).items():
            for stat, value in entry.items():
                logged[f"gradflow/{name}/{stat}"] = value
        for key in [k for k in values if k.startswith("fit:")]:
            name = key[4:]
            if not values[key] <= FIT_TOLERANCE:  # NaN too
                values[f"gain:{name}"] = float("nan")
                self.problems.report(
                    "unknown_norm_form",
                    f"the output of normalization `{name}` ({type(self._modules[name]).__name__}) is neither "
                    "g * (x - mean) / std (+ b) nor g * x / rms (+ b); its effective_gain is logged as NaN",
                )
        for name in [k[5:] for k in values if k.startswith("gain:")]:
            logged[f"gradflow/{name}/effective_gain"] = values[f"gain:{name}"]
        for key, value in values.items():
            kind, _, name = key.partition(":")
            if kind == "spectral":
                logged[f"gradflow/{name}/spectral_norm"] = value
            elif kind == "param":
                logged[f"gradflow/{name}/param_grad_norm"] = value
        if not self.residual:
            self._analytic(hidden, values, logged)
        if hidden:
            total = logged[f"gradflow/{hidden[0]}/cum_product"]
            logged["gradflow/total/cum_product"] = total
            self._check_band(total)
        logged["gradflow/total/flow_events"] = float(self.flow_events)
        logged["gradflow/total/nonfinite_events"] = float(self.nonfinite_events)
        return logged

    def _analytic(self, hidden: list[str], values: dict[str, float], logged: dict[str, float]) -> None:
        """The plain chain's prediction: ``||W_l|| * g_l / sigma_l`` per hidden layer and its products."""
        # analytic: ||W_l|| * g_l / sigma_l per hidden layer, in the measured (forward) order
        by_hidden = {link.hidden: link for link in self.links}
        analytic = []
        for name in hidden:
            link = by_hidden.get(name)
            if link is None or link.weight is None:
                analytic.append(float("nan"))
                continue
            gain = values.get(f"gain:{link.norm}", float("nan")) if link.norm is not None else 1.0
            analytic.append(values[f"spectral:{link.weight}"] * gain)
        output_gain = values.get(f"spectral:{self.output_layer}") if self.output_layer is not None else None
        for name, gain in zip(hidden, analytic):
            logged[f"gradflow/{name}/analytic_gain"] = gain
        if output_gain is not None:
            logged[f"gradflow/{OUTPUT}/analytic_gain"] = output_gain
        cumulative = analytic_flow(hidden, analytic, output_gain)
        for name, product in cumulative.items():
            logged[f"gradflow/{name}/analytic_cum_product"] = product
        if hidden:
            logged["gradflow/total/analytic_cum_product"] = cumulative[hidden[0]]

    def _check_band(self, product: float) -> None:
        low, high = self.band
        if math.isnan(product):
            return
        if product < low:
            self.flow_events += 1
            self.problems.report(
                "vanishing_gradients",
                f"the gradient shrinks by {product:.3g} from the output to the first watched layer "
                f"(below the band's {low:g}): vanishing gradients",
            )
        elif product > high:
            self.flow_events += 1
            self.problems.report(
                "exploding_gradients",
                f"the gradient grows by {product:.3g} from the output to the first watched layer "
                f"(above the band's {high:g}): exploding gradients",
            )

    # ---- figure
    # ----------------------------------------------------------------------------------------------
    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs or not self.last:
            return
        writer = tensorboard_writer(trainer, self.problems)
        if writer is None:
            return
        add_rgb_image(writer, "gradflow/figure", self.figure(), trainer.global_step)
        writer.flush()

    def figure(self) -> np.ndarray:
        """The gradient-flow figure of the last logged step as an ``(H, W, 3)`` uint8 image."""
        names = [name for name in self._hidden_order() if f"gradflow/{name}/grad_norm" in self.last]
        norms = [self.last[f"gradflow/{name}/grad_norm"] for name in names]
        measured = [self.last.get(f"gradflow/{name}/cum_product", float("nan")) for name in names]
        analytic = [self.last.get(f"gradflow/{name}/analytic_cum_product", float("nan")) for name in names]
        return gradient_flow_chart(names, norms, measured, analytic)

    def _hidden_order(self) -> list[str]:
        return [layer.name for layer in self.hidden_layers] + [OUTPUT]

    @override
    def _release(self) -> None:
        super()._release()
        self._active = False
        self._order, self._grad_norms, self._gains, self._fits, self._param_norms = [], {}, {}, {}, {}
        self._fired, self._no_grad = set(), set()

    # ---- state
    # -----------------------------------------------------------------------------------------------
    @override
    def _state(self) -> dict[str, Any]:
        return {
            "power": self.power.state_dict(),
            "flow_events": self.flow_events,
            "nonfinite_events": self.nonfinite_events,
        }

    @override
    def _load_state(self, state: dict[str, Any]) -> None:
        self.power.load_state_dict(state["power"])
        self.flow_events = int(state["flow_events"])
        self.nonfinite_events = int(state["nonfinite_events"])
