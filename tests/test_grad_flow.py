"""GradFlowMonitor and lightning_interp.stats.grad_flow: exactness against autograd.grad by hand, spectral
norms against torch.linalg, the vanishing-gradient science, zero interference, hooks, precision, NaN/Inf,
arguments."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_interp.callbacks import GradFlowMonitor
from lightning_interp.data import DigitsDataModule
from lightning_interp.errors import LightningInterpError
from lightning_interp.models import ClassifierModule, DeepMLP, DigitsCNN
from lightning_interp.stats.grad_flow import PowerIteration, chain_links, param_grad_norms
from tests.helpers import (
    assert_hook_hygiene,
    assert_same_weights,
    fit,
    hook_free_copy,
    quiet_trainer,
    weights_of,
)

RTOL = 1e-5


def reference_flow(model: DeepMLP, batch) -> dict[str, float]:
    """dL/dH_l of every hidden layer and of the logits by torch.autograd.grad, on a hook-free copy."""
    net = hook_free_copy(model).net
    x, y = batch
    hidden, h = [], x
    names = []
    for name, module in net.named_children():
        h = module(h)
        if name.startswith("act"):
            hidden.append(h)
            names.append(f"net.{name}")
    loss = F.cross_entropy(h, y)
    grads = torch.autograd.grad(loss, hidden + [h])
    norms = [float(g.reshape(g.shape[0], -1).norm(dim=1).mean()) for g in grads]
    out = {f"gradflow/{n}/grad_norm": v for n, v in zip(names, norms[:-1])}
    out["gradflow/output/grad_norm"] = norms[-1]
    for i in range(1, len(names)):
        out[f"gradflow/{names[i]}/backward_gain"] = norms[i - 1] / norms[i]
    out["gradflow/output/backward_gain"] = norms[-2] / norms[-1]
    for name, norm in zip(names, norms[:-1]):
        out[f"gradflow/{name}/cum_product"] = norm / norms[-1]
    out["gradflow/total/cum_product"] = norms[0] / norms[-1]
    # effective gains g/sigma of every BatchNorm from the batch statistics of its input
    h = x
    for name, module in net.named_children():
        if isinstance(module, nn.BatchNorm1d):
            sigma = (h.var(dim=0, unbiased=False) + module.eps).sqrt()
            out[f"gain:net.{name}"] = float((module.weight.abs() / sigma).mean())
        h = module(h)
    return out


class Recorder(Callback):
    """Computes the reference before each step; snapshots the monitor's values and the spectral norms after
    it."""

    def __init__(self, monitor: GradFlowMonitor) -> None:
        self.monitor = monitor
        self.expected: list[dict[str, float]] = []
        self.logged: list[dict[str, float]] = []
        self.spectral: list[dict[str, float]] = []
        self.params: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.expected.append(reference_flow(pl_module, batch))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        norms = {}
        for name, module in pl_module.named_modules():
            grads = [p.grad.reshape(-1) for p in module.parameters(recurse=False) if p.grad is not None]
            if grads:
                norms[name] = float(torch.linalg.vector_norm(torch.cat(grads)))
        self.params.append(norms)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append(dict(self.monitor.last))
        self.spectral.append(
            {
                name: float(torch.linalg.matrix_norm(m.weight.detach(), 2))
                for name, m in pl_module.named_modules()
                if isinstance(m, nn.Linear)
            }
        )


def small_mlp() -> DeepMLP:
    return DeepMLP(depth=4, width=16, norm="batch", activation="tanh")


def test_gradient_norms_gains_products_match_autograd_by_hand():
    monitor = GradFlowMonitor()
    recorder = Recorder(monitor)
    fit(
        [monitor, recorder],
        small_mlp,
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=0,
        log_every_n_steps=1,
    )
    assert len(recorder.expected) == 4
    checked = 0
    for expected, logged, params in zip(recorder.expected, recorder.logged, recorder.params):
        for tag, value in expected.items():
            if tag.startswith("gain:"):
                continue
            assert logged[tag] == pytest.approx(value, rel=RTOL), tag
            checked += 1
        # analytic gain = spectral norm x g/sigma of the BatchNorm feeding the layer
        for i in range(4):
            ratio = logged[f"gradflow/net.act{i}/analytic_gain"] / logged[f"gradflow/net.fc{i}/spectral_norm"]
            assert ratio == pytest.approx(expected[f"gain:net.norm{i}"], rel=RTOL)
        # parameter-gradient norms grouped per module
        for name, value in params.items():
            assert logged[f"gradflow/{name}/param_grad_norm"] == pytest.approx(value, rel=RTOL)
        total = math.sqrt(sum(v**2 for v in params.values()))
        assert logged["gradflow/total/param_grad_norm"] == pytest.approx(total, rel=RTOL)
    assert checked == 4 * (4 + 1 + 3 + 1 + 4 + 1)


def test_spectral_norms_converge_to_matrix_norm():
    monitor = GradFlowMonitor()
    recorder = Recorder(monitor)
    fit(
        [monitor, recorder],
        small_mlp,
        max_epochs=1,
        limit_train_batches=20,
        limit_val_batches=0,
        log_every_n_steps=1,
    )
    # one power-iteration step per logged step; measured errors: ~25% at step 0, ~2% at step 10, < 0.2% at
    # step 20
    final_logged, final_true = recorder.logged[-1], recorder.spectral[-1]
    for name in ["net.fc0", "net.fc1", "net.fc2", "net.fc3", "net.head"]:
        assert final_logged[f"gradflow/{name}/spectral_norm"] == pytest.approx(final_true[name], rel=0.01), (
            name
        )
    # after one step the estimate is a lower bound that is not yet there (the test can fail)
    first = recorder.logged[0]["gradflow/net.fc1/spectral_norm"]
    assert first <= recorder.spectral[0]["net.fc1"] * (1 + 1e-5)


def test_power_iteration_on_conv_kernel_matrix():
    conv = nn.Conv2d(3, 8, 3)
    power = PowerIteration(seed=1)
    for _ in range(30):
        sigma = power.step("conv", conv.weight.reshape(8, -1))
    assert float(sigma) == pytest.approx(
        float(torch.linalg.matrix_norm(conv.weight.detach().reshape(8, -1), 2)), rel=1e-3
    )


# ---- the science
# --------------------------------------------------------------------------------------------- Deep tanh MLP
# (16 hidden layers, PyTorch's default init): without normalization the gradient at the first hidden layer is
# < 1e-2 of the output's (measured ~1e-4); with BatchNorm or LayerNorm the product stays in [0.1, 10]
# (measured 0.3-4.4 over the first 20 steps at depth 20).
VANISHING_BELOW = 1e-2
PRESERVED_BAND = (0.1, 10.0)


@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
def test_normalization_keeps_the_cumulative_gradient_product_near_one(norm):
    monitor = GradFlowMonitor()
    products = []

    class Collect(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            products.append(monitor.last["gradflow/total/cum_product"])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(
            [monitor, Collect()],
            lambda: DeepMLP(depth=16, norm=norm, activation="tanh"),
            max_epochs=1,
            limit_train_batches=6,
            limit_val_batches=0,
            log_every_n_steps=1,
        )
    at_init, after = products[0], products[-1]
    if norm == "none":
        assert at_init < VANISHING_BELOW and after < VANISHING_BELOW
        assert monitor.flow_events >= 1 or at_init >= monitor.band[0]
    else:
        for value in (at_init, after):
            assert PRESERVED_BAND[0] <= value <= PRESERVED_BAND[1], (norm, products)


def test_vanishing_warns_once_and_counts_events():
    monitor = GradFlowMonitor(band=(1e-2, 1e2))
    with pytest.warns(UserWarning, match="vanishing gradients") as record:
        fit(
            [monitor],
            lambda: DeepMLP(depth=16, norm="none"),
            max_epochs=1,
            limit_train_batches=4,
            limit_val_batches=0,
            log_every_n_steps=1,
        )
    assert sum("vanishing" in str(w.message) for w in record) == 1
    assert monitor.flow_events == 4 and monitor.last["gradflow/total/flow_events"] == 4.0


# ---- non-negotiables
# -------------------------------------------------------------------------------------------
def test_zero_interference_bitwise(tmp_path):
    kwargs = dict(max_epochs=2, limit_train_batches=5, limit_val_batches=2, log_every_n_steps=1)
    baseline, _ = fit([], **kwargs)
    logger = TensorBoardLogger(str(tmp_path))
    watched, _ = fit([GradFlowMonitor()], logger=logger, **kwargs)
    assert_same_weights(weights_of(baseline), weights_of(watched))
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in watched.parameters())


def test_logs_only_on_logged_steps_and_writes_figure(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    monitor = GradFlowMonitor(every_n_epochs=1)
    calls = []
    original = monitor._collect
    monitor._collect = lambda: calls.append(1) or original()  # type: ignore[method-assign]
    fit(
        [monitor],
        max_epochs=1,
        limit_train_batches=7,
        limit_val_batches=0,
        log_every_n_steps=3,
        logger=logger,
    )
    assert len(calls) == 2  # steps 2 and 5 of 0..6
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("gradflow/total/cum_product")]
    assert steps == [2, 5]
    assert "gradflow/figure" in events.Tags()["images"]
    assert "gradflow/net.relu1/grad_norm" in events.Tags()["scalars"]


def test_hooks_removed_after_fit_raise_interrupt_and_two_fits():
    assert_hook_hygiene(GradFlowMonitor, hooks_during_fit=4 + 1 + 4)  # hidden layers, output layer, normalizations


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_reduced_precision_gives_unscaled_values(precision):
    kwargs = dict(max_epochs=1, limit_train_batches=1, limit_val_batches=0, log_every_n_steps=1)
    reference = GradFlowMonitor()
    fit([reference], small_mlp, **kwargs)
    monitor = GradFlowMonitor()
    if precision == "16-mixed":  # fp16 autocast on CPU with a gradient scaler at 1024
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        fit([monitor], small_mlp, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], **kwargs)
        assert monitor._scale == 1024.0
    else:
        fit([monitor], small_mlp, precision=precision, **kwargs)
    for tag in ["gradflow/net.act0/grad_norm", "gradflow/output/grad_norm", "gradflow/total/param_grad_norm"]:
        assert monitor.last[tag] == pytest.approx(reference.last[tag], rel=0.05), tag


class Poison(nn.Module):
    """Identity, except at training call ``at``: NaN activations (``kind="forward"``) or Inf gradients."""

    def __init__(self, at: int, kind: str) -> None:
        super().__init__()
        self.at, self.kind, self.calls = at, kind, 0

    def forward(self, x):
        if not self.training:
            return x
        self.calls += 1
        if self.calls - 1 != self.at:
            return x
        if self.kind == "forward":
            return x * float("nan")
        return _InfGrad.apply(x)


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class PoisonedMLP(ClassifierModule):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 16),
            nn.Tanh(),
            Poison(1, kind),
            nn.Linear(16, 16),
            nn.Tanh(),
            nn.Linear(16, 10),
        )
        from torchmetrics.classification import MulticlassAccuracy

        self.val_accuracy = MulticlassAccuracy(10)


@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_nan_and_inf_are_counted_not_fatal(kind):
    monitor = GradFlowMonitor()
    with pytest.warns(UserWarning, match="NaN/Inf"):
        fit(
            [monitor],
            lambda: PoisonedMLP(kind),
            max_epochs=1,
            limit_train_batches=3,
            limit_val_batches=0,
            log_every_n_steps=1,
        )
    assert monitor.nonfinite_events >= 1
    assert monitor.last["gradflow/total/nonfinite_events"] >= 1


def test_chain_links_and_param_grouping():
    model = DigitsCNN(norm="group")
    links, output = chain_links(model, ["net.relu1", "net.relu2", "net.relu3", "net.relu4"])
    assert [(link.weight, link.norm) for link in links] == [
        ("net.conv1", "net.norm1"),
        ("net.conv2", "net.norm2"),
        ("net.conv3", "net.norm3"),
        ("net.fc1", "net.norm4"),
    ]
    assert output == "net.fc2"
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    norms = param_grad_norms(model)
    expected = torch.cat([model.net.conv1.weight.grad.reshape(-1), model.net.conv1.bias.grad])
    assert float(norms["net.conv1"]) == pytest.approx(float(expected.norm()), rel=RTOL)


def test_bad_arguments():
    with pytest.raises(LightningInterpError, match="`every_n_epochs`"):
        GradFlowMonitor(every_n_epochs=0)
    with pytest.raises(LightningInterpError, match="`band`"):
        GradFlowMonitor(band=(10.0, 1.0))
    with pytest.raises(LightningInterpError, match="band"):
        GradFlowMonitor(band=(0.0, 1.0))
    with pytest.raises(LightningInterpError, match="`band`"):
        GradFlowMonitor(band=1.0)  # type: ignore[arg-type]
    with pytest.raises(LightningInterpError, match="`norm_types`"):
        GradFlowMonitor(norm_types=[int])
    with pytest.raises(LightningInterpError, match="matches nothing"):
        quiet_trainer([GradFlowMonitor(layers="nope")], max_epochs=1).fit(DigitsCNN(), DigitsDataModule())


def test_state_dict_round_trip_and_repr():
    monitor = GradFlowMonitor()
    fit([monitor], small_mlp, max_epochs=1, limit_train_batches=2, limit_val_batches=0, log_every_n_steps=1)
    state = monitor.state_dict()
    fresh = GradFlowMonitor()
    fresh.load_state_dict(state)
    assert fresh.power.vectors.keys() == monitor.power.vectors.keys()
    assert torch.equal(fresh.power.vectors["net.fc0"], monitor.power.vectors["net.fc0"].cpu())
    assert "band=(0.0001, 10000.0)" in repr(monitor)
    assert GradFlowMonitor(band=(1e-3, 1e3)).state_key != monitor.state_key
