"""NormStatsMonitor and lightning_interp.stats.norm_stats: statistics against numpy by hand from independently
captured tensors (BatchNorm train and eval mode, LayerNorm, GroupNorm, RMSNorm, InstanceNorm), hidden-layer
fractions, zero interference, hooks, precision, NaN/Inf, a model without normalization, arguments."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from lightning import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_interp.callbacks import NormStatsMonitor
from lightning_interp.data import DigitsDataModule
from lightning_interp.errors import LightningInterpError
from lightning_interp.models import ClassifierModule, DeepMLP, DigitsCNN
from lightning_interp.stats.norm_stats import activation_stats, effective_gain, norm_layer_stats
from tests.helpers import assert_hook_hygiene, assert_same_weights, fit, quiet_trainer, weights_of

RTOL = 1e-5


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def bn_reference(x: np.ndarray, y: np.ndarray, gamma, beta, run_mean, run_var, eps, training: bool) -> dict:
    """BatchNorm statistics by hand in float64 numpy (x: (N, C, ...))."""
    axes = (0, *range(2, x.ndim))
    batch_mean, batch_var = x.mean(axis=axes), x.var(axis=axes)
    sigma = np.sqrt((batch_var if training else run_var) + eps)
    run_std = np.sqrt(run_var + eps)
    return {
        "in_mean": x.mean(),
        "in_std": x.std(),
        "out_mean": y.mean(),
        "out_std": y.std(),
        "gamma_abs_mean": np.abs(gamma).mean(),
        "beta_mean": beta.mean(),
        "effective_gain": (np.abs(gamma) / sigma).mean(),
        "running_mean_dist": (np.abs(batch_mean - run_mean) / run_std).mean(),
        "running_std_ratio": (np.sqrt(batch_var + eps) / run_std).mean(),
    }


class CaptureNorm1(Callback):
    """Before each step: the input of ``net.norm1`` from a hook-free copy, and the running statistics before
    the step; after it, the monitor's values."""

    def __init__(self, monitor: NormStatsMonitor) -> None:
        self.monitor = monitor
        self.expected: list[dict] = []
        self.logged: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        clone = copy.deepcopy(pl_module)
        for module in clone.modules():
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
        x = clone.net.conv1(batch[0])
        bn = pl_module.net.norm1
        run_mean, run_var = np_(bn.running_mean), np_(bn.running_var)
        y = clone.net.norm1(x)
        gamma, beta = np_(bn.weight), np_(bn.bias)
        self.expected.append(
            bn_reference(np_(x), np_(y), gamma, beta, run_mean, run_var, bn.eps, training=True)
        )
        h = clone.net.relu2(clone.net.norm2(clone.net.conv2(clone.net.relu1(y))))
        self.expected[-1]["relu2_dead"] = float((np_(h).max(axis=(0, 2, 3)) <= 0).mean())
        self.expected[-1]["relu2_mean"] = float(np_(h).mean())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append(dict(self.monitor.last))


def test_batchnorm_train_mode_statistics_match_hand_computation():
    monitor = NormStatsMonitor()
    capture = CaptureNorm1(monitor)
    fit(
        [monitor, capture],
        lambda: DigitsCNN(norm="batch"),
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=0,
        log_every_n_steps=1,
    )
    for expected, logged in zip(capture.expected, capture.logged):
        for stat, value in expected.items():
            if stat.startswith("relu2"):
                continue
            assert logged[f"norm/net.norm1/{stat}"] == pytest.approx(value, rel=RTOL, abs=1e-7), stat
        assert logged["norm/net.relu2/dead_frac"] == pytest.approx(expected["relu2_dead"], abs=1e-7)
        assert logged["norm/net.relu2/act_mean"] == pytest.approx(expected["relu2_mean"], rel=RTOL)
    # the running statistics drift after the first step: the mismatch is non-trivial and still matched
    assert capture.logged[1]["norm/net.norm1/running_mean_dist"] > 0.01


def test_batchnorm_eval_mode_uses_running_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(4))
        bn.running_var.copy_(torch.rand(4) + 0.5)
        bn.weight.copy_(torch.randn(4))
        bn.bias.copy_(torch.randn(4))
    bn.eval()
    x = torch.randn(8, 4, 3, 3) * 2 + 1
    y = bn(x)
    stats = norm_layer_stats(bn, x, y)
    expected = bn_reference(
        np_(x),
        np_(y),
        np_(bn.weight),
        np_(bn.bias),
        np_(bn.running_mean),
        np_(bn.running_var),
        bn.eps,
        training=False,
    )
    for stat, value in expected.items():
        assert float(stats[stat]) == pytest.approx(value, rel=RTOL), stat
    # and train mode on the same input divides by the batch statistics instead
    bn.train()
    train_gain = float(effective_gain(bn, x))
    assert train_gain == pytest.approx(
        bn_reference(
            np_(x),
            np_(y),
            np_(bn.weight),
            np_(bn.bias),
            np_(bn.running_mean),
            np_(bn.running_var),
            bn.eps,
            training=True,
        )["effective_gain"],
        rel=RTOL,
    )
    assert abs(train_gain - float(stats["effective_gain"])) > 0.01


@pytest.mark.parametrize("kind", ["layer", "group", "rms", "instance"])
def test_per_example_normalizations_effective_gain(kind):
    torch.manual_seed(1)
    x = torch.randn(5, 6, 4, 4) * torch.rand(5, 1, 1, 1) * 3
    xd = np_(x)
    if kind == "layer":
        module = nn.LayerNorm([6, 4, 4])
        sigma = np.sqrt(xd.reshape(5, -1).var(axis=1) + module.eps)[:, None]
    elif kind == "group":
        module = nn.GroupNorm(3, 6)
        sigma = np.repeat(np.sqrt(xd.reshape(5, 3, -1).var(axis=2) + module.eps), 2, axis=1)  # (N, C)
    elif kind == "rms":
        module = nn.RMSNorm([6, 4, 4], eps=1e-6)
        sigma = np.sqrt((xd.reshape(5, -1) ** 2).mean(axis=1) + 1e-6)[:, None]
    else:
        module = nn.InstanceNorm2d(6, affine=True)
        sigma = np.sqrt(xd.reshape(5, 6, -1).var(axis=2) + module.eps)
    with torch.no_grad():
        module.weight.copy_(torch.randn_like(module.weight))
    gamma = np.abs(np_(module.weight))
    expected = (
        gamma.reshape(1, -1) / sigma
    ).mean()  # sigma (N, 1) per example or (N, C) per example and channel
    assert float(effective_gain(module, x)) == pytest.approx(expected, rel=RTOL)
    stats = norm_layer_stats(module, x, module(x))
    assert float(stats["out_std"]) == pytest.approx(np_(module(x)).std(), rel=RTOL)


def test_hidden_layer_fractions_by_hand():
    a = torch.tensor([[0.995, -0.2, 0.999], [-0.9999, 0.5, 0.1]])
    assert float(activation_stats(nn.Tanh(), a)["saturated_frac"]) == pytest.approx(3 / 6)
    s = torch.tensor([[0.005, 0.5], [0.995, 0.2]])
    assert float(activation_stats(nn.Sigmoid(), s)["saturated_frac"]) == pytest.approx(2 / 4)
    conv = torch.zeros(3, 4, 2, 2)
    conv[1, 0, 1, 1] = 0.1  # channel 0 fires once; channel 2 fires everywhere; 1 and 3 never
    conv[:, 2] = 1.0
    stats = activation_stats(nn.ReLU(), conv)
    assert float(stats["dead_frac"]) == pytest.approx(0.5)
    assert float(stats["act_std"]) == pytest.approx(np_(conv).std(), rel=RTOL)
    assert "dead_frac" not in activation_stats(nn.Tanh(), a) and "saturated_frac" not in stats


def test_half_precision_activations():
    x = torch.randn(16, 8) * 3
    for dtype in (torch.float16, torch.bfloat16):
        half = activation_stats(nn.Tanh(), torch.tanh(x).to(dtype))
        full = activation_stats(nn.Tanh(), torch.tanh(x).to(dtype).float())
        assert all(float(half[k]) == pytest.approx(float(full[k]), rel=1e-6) for k in full)
        bn = nn.BatchNorm1d(8)
        assert float(effective_gain(bn, x.to(dtype))) == pytest.approx(
            float(effective_gain(bn, x.to(dtype).float()))
        )


def test_bf16_mixed_fit_logs_finite_values():
    monitor = NormStatsMonitor()
    fit(
        [monitor],
        lambda: DigitsCNN(norm="group"),
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        log_every_n_steps=1,
        precision="bf16-mixed",
    )
    assert monitor.last and all(np.isfinite(v) for v in monitor.last.values())
    assert monitor.nonfinite_events == 0


# ---- non-negotiables
# -------------------------------------------------------------------------------------------
def test_zero_interference_bitwise(tmp_path):
    kwargs = dict(max_epochs=2, limit_train_batches=5, limit_val_batches=2, log_every_n_steps=1)
    baseline, _ = fit([], **kwargs)
    watched, _ = fit([NormStatsMonitor()], logger=TensorBoardLogger(str(tmp_path)), **kwargs)
    assert_same_weights(weights_of(baseline), weights_of(watched))  # BatchNorm running statistics included


def test_tags_histograms_layout_and_logging_frequency(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    monitor = NormStatsMonitor(every_n_epochs=1)
    fit(
        [monitor],
        max_epochs=1,
        limit_train_batches=7,
        limit_val_batches=0,
        log_every_n_steps=3,
        logger=logger,
    )
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("norm/net.norm2/effective_gain")] == [2, 5]
    scalars = set(events.Tags()["scalars"])
    for tag in [
        "norm/net.norm1/running_mean_dist",
        "norm/net.relu4/dead_frac",
        "norm/total/effective_gain",
        "norm/total/dead_frac",
    ]:
        assert tag in scalars
    assert "norm/net.relu4/saturated_frac" not in scalars  # ReLU: no saturation statistic
    histograms = set(events.Tags()["histograms"])
    assert {"norm/net.relu1/activations", "norm/net.norm1/gamma"} <= histograms


def test_csv_logger_gets_scalars(tmp_path):
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    with pytest.warns(UserWarning, match="no TensorBoardLogger"):
        fit(
            [NormStatsMonitor()],
            max_epochs=1,
            limit_train_batches=2,
            limit_val_batches=0,
            log_every_n_steps=1,
            logger=logger,
        )
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "norm/net.norm3/in_std" in header and "norm/net.relu3/dead_frac" in header


def test_hooks_removed_after_fit_raise_interrupt_and_two_fits():
    assert_hook_hygiene(NormStatsMonitor, hooks_during_fit=2 * 4 + 4)  # pre + forward per norm, forward per hidden


class NaNAfterFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * float("nan") if self.calls == 2 else x


def test_nan_activations_are_counted_not_fatal():
    class Model(ClassifierModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Flatten(),
                nn.Linear(64, 16),
                nn.BatchNorm1d(16),
                nn.Tanh(),
                NaNAfterFirst(),
                nn.Linear(16, 10),
            )
            from torchmetrics.classification import MulticlassAccuracy

            self.val_accuracy = MulticlassAccuracy(10)

    monitor = NormStatsMonitor(layers=["net.3", "net.4"])
    with pytest.warns(UserWarning, match="NaN/Inf"):
        fit([monitor], Model, max_epochs=1, limit_train_batches=3, limit_val_batches=0, log_every_n_steps=1)
    assert monitor.nonfinite_events >= 1 and monitor.last["norm/total/nonfinite_events"] >= 1


def test_model_without_normalization_logs_hidden_stats_with_one_info_line(caplog):
    monitor = NormStatsMonitor()
    with caplog.at_level(logging.INFO):
        fit(
            [monitor],
            lambda: DeepMLP(depth=3, width=16, norm="none"),
            max_epochs=1,
            limit_train_batches=2,
            limit_val_batches=0,
            log_every_n_steps=1,
        )
    lines = [r for r in caplog.records if "no normalization layer" in r.getMessage()]
    assert len(lines) == 1
    assert {"norm/net.act0/act_std", "norm/net.act2/saturated_frac", "norm/total/saturated_frac"} <= set(
        monitor.last
    )
    assert not any("effective_gain" in tag for tag in monitor.last)


def test_bad_arguments():
    with pytest.raises(LightningInterpError, match="`every_n_epochs`"):
        NormStatsMonitor(every_n_epochs=0)
    with pytest.raises(LightningInterpError, match="`histogram_samples`"):
        NormStatsMonitor(histogram_samples=-1)
    with pytest.raises(LightningInterpError, match="`norm_types`"):
        NormStatsMonitor(norm_types=["BatchNorm"])  # type: ignore[list-item]
    with pytest.raises(LightningInterpError, match="matches nothing"):
        quiet_trainer([NormStatsMonitor(layers=["net.nope"])], max_epochs=1).fit(
            DigitsCNN(), DigitsDataModule()
        )


def test_state_round_trip_and_repr():
    monitor = NormStatsMonitor(every_n_epochs=3)
    monitor.nonfinite_events = 2
    fresh = NormStatsMonitor(every_n_epochs=3)
    fresh.load_state_dict(monitor.state_dict())
    assert fresh.nonfinite_events == 2
    assert "every_n_epochs=3" in repr(monitor) and fresh.state_key == monitor.state_key
    assert NormStatsMonitor().state_key != monitor.state_key


def test_batchnorm_moments_are_computed_once_with_both_monitors(monkeypatch):
    """With NormStatsMonitor and GradFlowMonitor on one logged step, each BatchNorm input's channel moments are
    computed once (GradFlow's gains reuse NormStats'); a train-mode BatchNorm's output moments come in closed
    form from gamma and beta (no pass over the output), and still match the output (the hand-computation test
    above checks out_mean/out_std)."""
    from lightning_interp.callbacks import GradFlowMonitor
    from lightning_interp.stats import norm_stats

    computed = []
    real = norm_stats._compute_channel_moments
    monkeypatch.setattr(norm_stats, "_compute_channel_moments", lambda x: computed.append(x.shape) or real(x))

    def moments_computed(callbacks):
        computed.clear()
        fit(callbacks, lambda: DigitsCNN(norm="batch"), max_epochs=1, limit_train_batches=2, limit_val_batches=0,
            log_every_n_steps=1)  # fmt: skip
        return len(computed)

    monitor = NormStatsMonitor()
    norm_alone, gradflow_alone = moments_computed([monitor]), moments_computed([GradFlowMonitor()])
    assert gradflow_alone > 0  # GradFlow computes BatchNorm gains on this plain chain
    assert moments_computed([NormStatsMonitor(), GradFlowMonitor()]) == norm_alone
    # per logged step: one computation per BatchNorm input and per hidden output, none for BatchNorm outputs
    assert len(monitor.norm_layers) == 4 and len(monitor.hidden_layers) > 0
    assert norm_alone == 2 * (len(monitor.norm_layers) + len(monitor.hidden_layers))


def test_batchnorm_statistics_of_inference_mode_tensors():
    """Tensors made under torch.inference_mode() keep no version counter: their moments are computed each time,
    and equal the same computation outside it."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).train()
    x = torch.randn(4, 3, 5, 5)
    expected = effective_gain(bn, x.clone())
    with torch.inference_mode():
        inside = x.clone()
        assert float(effective_gain(bn, inside)) == pytest.approx(float(expected), rel=1e-6)
        stats = norm_layer_stats(bn, inside, bn(inside))
    assert float(stats["out_std"]) == pytest.approx(float(bn(x).std(unbiased=False)), rel=1e-5)
