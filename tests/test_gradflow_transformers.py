"""GradFlowMonitor and NormStatsMonitor on transformers and other third-party models, at their defaults: Hugging
Face BERT, GPT-2 and ViT built from tiny configs, torch ``nn.TransformerEncoder`` classifiers (Post-LN and
Pre-LN), an attention-free residual MLP with RMSNorm-like library norms. Every logged number is checked against
an independent computation on a hook-free copy of the model (``torch.autograd.grad`` of the same loss with
respect to block outputs captured by the test's own hooks; effective gains by hand in float64 numpy)."""

from __future__ import annotations

import warnings

import lightning as L
import numpy as np
import pytest
import torch
from lightning import Callback
from torch import nn

from lightning_interp.callbacks import GradFlowMonitor, NormStatsMonitor
from lightning_interp.errors import LightningInterpError
from lightning_interp.layers import called_functionally
from lightning_interp.stats.grad_flow import PowerIteration, chain_links, weight_matrix
from lightning_interp.stats.norm_stats import FIT_TOLERANCE, effective_gain, library_norm_sigma
from tests.helpers import assert_same_weights, count_hooks, hook_free_copy, quiet_trainer, weights_of
from tests.transformer_models import (
    MODELS,
    AttentionFreeClassifier,
    DictClassifier,
    EncoderClassifier,
    LlamaRMSNorm,
    SyntheticDataModule,
    T5LayerNorm,
    tiny_bert,
)

pytest.importorskip("transformers")

RTOL = 1e-5


def _first(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def layernorm_gain_by_hand(x: torch.Tensor, module: nn.Module, rms: bool = False) -> float:
    """mean over tokens and features of |gamma_j| / sigma_token, in float64 numpy."""
    xd = x.detach().double().numpy()
    eps = getattr(module, "eps", None)
    eps = module.variance_epsilon if eps is None else eps
    spread = (xd**2).mean(axis=-1) if rms else xd.var(axis=-1)
    sigma = np.sqrt(spread + eps)
    gamma = np.abs(module.weight.detach().double().numpy())
    return float((gamma[None, None, :] / sigma[..., None]).mean())


class Reference(Callback):
    """Before each step, on a hook-free copy with the step's batch: the gradient of the same loss with respect
    to the outputs of the blocks and the stem (captured by this test's own hooks), the gradients of every block
    parameter, the input of one norm layer and the block outputs. After each step: what the monitors logged."""

    def __init__(self, watched: list[str], norm: str, rms: bool, monitors: tuple[GradFlowMonitor, NormStatsMonitor]):
        self.watched, self.norm, self.rms, self.monitors = watched, norm, rms, monitors
        self.expected: list[dict[str, float]] = []
        self.logged: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        clone = hook_free_copy(pl_module)
        modules = dict(clone.named_modules())
        outputs, norm_input = {}, {}
        handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: outputs.setdefault(n, _first(o)))
                   for n in self.watched]  # fmt: skip
        handles.append(modules[self.norm].register_forward_pre_hook(lambda m, a: norm_input.setdefault("x", a[0])))
        loss = clone.loss(batch)
        for handle in handles:
            handle.remove()
        names = list(outputs)
        blocks = [n for n in names if any(n == b for b in self.watched[1:])]
        params = {n: [p for p in modules[n].parameters()] for n in blocks}
        flat = [p for n in blocks for p in params[n]]
        grads = torch.autograd.grad(loss, [outputs[n] for n in names] + flat)
        expected = {}
        for n, g in zip(names, grads):
            expected[f"gradflow/{n}/grad_norm"] = float(g.reshape(g.shape[0], -1).norm(dim=1).mean())
        rest = list(grads[len(names) :])
        for n in blocks:
            block_grads, rest = rest[: len(params[n])], rest[len(params[n]) :]
            square = sum(g.double().square().sum() for g in block_grads)
            expected[f"gradflow/{n}/param_grad_norm"] = float(torch.sqrt(square))
        gain = layernorm_gain_by_hand(norm_input["x"], modules[self.norm], self.rms)
        expected[f"gradflow/{self.norm}/effective_gain"] = gain
        expected[f"norm/{self.norm}/effective_gain"] = gain
        for n in blocks:
            out = outputs[n].detach().double().numpy()
            expected[f"norm/{n}/act_mean"], expected[f"norm/{n}/act_std"] = float(out.mean()), float(out.std())
        self.expected.append(expected)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append({**self.monitors[0].last, **self.monitors[1].last})


def fit_with_reference(make, kind, watched, norm, rms=False):
    L.seed_everything(0, verbose=False)
    model = DictClassifier(make)
    hooks_before = count_hooks(model)
    monitors = (GradFlowMonitor(), NormStatsMonitor())
    reference = Reference(watched, norm, rms, monitors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer([*monitors, reference], max_epochs=2, log_every_n_steps=1, limit_val_batches=0).fit(
            model, SyntheticDataModule(kind)
        )
    return model, monitors, reference, hooks_before


@pytest.mark.parametrize("name", list(MODELS))
def test_defaults_follow_the_residual_stream_exactly(name):
    make, kind, blocks, stem, norm = MODELS[name]
    model, (gradflow, normstats), reference, hooks_before = fit_with_reference(make, kind, [stem, *blocks], norm)
    assert [layer.name for layer in gradflow.hidden_layers] == [stem, *blocks]
    assert len(reference.logged) == 8  # 2 epochs x 4 batches, every step logged
    for expected, logged in zip(reference.expected, reference.logged):
        for tag, value in expected.items():
            assert tag in logged, tag
            # a Post-LN block's output has mean ~1e-9: float32 round-off, hence the absolute tolerance there
            assert logged[tag] == pytest.approx(value, rel=RTOL, abs=1e-6 if "act_mean" in tag else 1e-9), tag
        # the measured products over blocks, and nothing analytic across residual blocks
        gains = [logged[f"gradflow/{b}/backward_gain"] for b in blocks]
        assert gains[-1] == pytest.approx(expected[f"gradflow/{blocks[-2]}/grad_norm"]
                                          / expected[f"gradflow/{blocks[-1]}/grad_norm"], rel=RTOL)  # fmt: skip
        assert logged["gradflow/output/grad_norm"] > 0
        assert not any("analytic" in tag for tag in logged)
    assert count_hooks(model) == hooks_before == 0
    assert len(gradflow.hooks) == len(normstats.hooks) == 0


def test_hooks_during_fit_on_bert_and_gone_after():
    make, kind, blocks, stem, _ = MODELS["bert"]
    seen = []

    class Count(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(count_hooks(pl_module))

    L.seed_everything(0, verbose=False)
    model = DictClassifier(make)
    monitors = [GradFlowMonitor(), NormStatsMonitor()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer([*monitors, Count()], max_epochs=1, log_every_n_steps=1).fit(model, SyntheticDataModule(kind))
    # GradFlow: stem + 2 blocks + classifier + 5 LayerNorms; NormStats: 2 per LayerNorm + stem + 2 blocks
    assert seen[0] == (3 + 1 + 5) + (2 * 5 + 3)
    assert count_hooks(model) == 0 and all(len(m.hooks) == 0 for m in monitors)


@pytest.mark.parametrize(
    "make", [lambda: tiny_bert(dropout=0.1), lambda: EncoderClassifier(norm_first=True, dropout=0.1)],
    ids=["bert", "pre-ln"],
)
def test_zero_interference_bitwise(make):
    # dropout and a shuffled loader: a callback drawing from the global RNG would change the weights
    kwargs = dict(max_epochs=2, log_every_n_steps=1, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.seed_everything(0, verbose=False)
        plain = DictClassifier(make)
        quiet_trainer([], **kwargs).fit(plain, SyntheticDataModule("tokens", shuffle=True))
        L.seed_everything(0, verbose=False)
        watched = DictClassifier(make)
        quiet_trainer([GradFlowMonitor(), NormStatsMonitor()], **kwargs).fit(
            watched, SyntheticDataModule("tokens", shuffle=True)
        )
    assert_same_weights(weights_of(plain), weights_of(watched))
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in watched.parameters())


# ---- library norms by role ------------------------------------------------------------------------------------
class CentredLayerNorm(nn.Module):
    """A library LayerNorm that does subtract the mean (nanoGPT's, with a bias and ``eps``)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d)), 1e-5

    def forward(self, x):
        return nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class GemmaRMSNorm(nn.Module):
    """Gemma's scale is ``1 + weight`` (weight initialised at 0): neither form the callbacks assume."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.zeros(d)), 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


@pytest.mark.parametrize("cls, rms", [(T5LayerNorm, True), (LlamaRMSNorm, True), (CentredLayerNorm, False),
                                      (nn.RMSNorm, True), (nn.LayerNorm, False)])  # fmt: skip
def test_effective_gain_divides_by_the_sigma_the_layer_uses(cls, rms):
    torch.manual_seed(0)
    module = cls(6) if cls is not nn.RMSNorm else nn.RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        module.weight.copy_(torch.randn(6))
    x = torch.randn(4, 5, 6) * torch.rand(4, 5, 1) * 3 + 2.0  # (B, T, D), a mean far from 0: the forms differ
    diagnostics = {}
    gain = float(effective_gain(module, x, output=module(x), diagnostics=diagnostics))
    assert gain == pytest.approx(layernorm_gain_by_hand(x, module, rms=rms), rel=RTOL)
    # the other form is far off: the test can tell them apart
    assert abs(gain - layernorm_gain_by_hand(x, module, rms=not rms)) > 0.05 * gain
    if cls not in (nn.RMSNorm, nn.LayerNorm):
        assert float(diagnostics["fit_error"]) < 1e-5


def test_library_norm_of_unknown_form_is_flagged():
    norm, x = GemmaRMSNorm(6), torch.randn(3, 4, 6) + 1.0
    sigma, error = library_norm_sigma(norm, x, norm(x))
    assert float(error) > FIT_TOLERANCE
    assert library_norm_sigma(GemmaRMSNorm(5), x) is None  # no dimension shaped like the weight


def test_attention_free_model_with_rmsnorm_like_library_classes():
    watched = ["model.embed", "model.blocks.0", "model.blocks.1"]
    for norm in ("model.blocks.0.norm", "model.blocks.1.norm"):
        model, (gradflow, normstats), reference, _ = fit_with_reference(AttentionFreeClassifier, "tokens", watched,
                                                                          norm, rms=True)  # fmt: skip
        assert [layer.name for layer in normstats.norm_layers] == ["model.blocks.0.norm", "model.blocks.1.norm",
                                                                   "model.norm"]  # fmt: skip
        for expected, logged in zip(reference.expected, reference.logged):
            for tag, value in expected.items():
                assert logged[tag] == pytest.approx(value, rel=RTOL, abs=1e-6 if "act_mean" in tag else 1e-9), tag


def test_unknown_norm_form_warns_once_and_logs_nan():
    class Gemmaish(AttentionFreeClassifier):
        def __init__(self):
            super().__init__()
            self.norm = GemmaRMSNorm(16)

    monitors = [NormStatsMonitor(), GradFlowMonitor()]
    with pytest.warns(UserWarning, match="neither") as record:
        L.seed_everything(0, verbose=False)
        quiet_trainer(monitors, max_epochs=1, log_every_n_steps=1).fit(DictClassifier(Gemmaish),
                                                                       SyntheticDataModule("tokens"))  # fmt: skip
    assert sum("neither" in str(w.message) for w in record) == 2  # once per callback
    assert np.isnan(monitors[0].last["norm/model.norm/effective_gain"])
    assert np.isnan(monitors[1].last["gradflow/model.norm/effective_gain"])
    assert np.isfinite(monitors[0].last["norm/model.blocks.0.norm/effective_gain"])


# ---- nothing to watch, functional submodules, Conv1D ---------------------------------------------------------
class LinearOnly(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.fc(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("make", [GradFlowMonitor, NormStatsMonitor])
def test_nothing_to_watch_at_defaults_warns_and_stays_idle(make):
    from lightning_interp.data import DigitsDataModule

    monitor, model = make(), LinearOnly()
    seen = []

    class Count(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(count_hooks(pl_module))

    with pytest.warns(UserWarning, match="`layers=`") as record:
        quiet_trainer([monitor, Count()], max_epochs=1, limit_train_batches=3, limit_val_batches=0,
                      log_every_n_steps=1).fit(model, DigitsDataModule())  # fmt: skip
    assert sum("stays idle" in str(w.message) for w in record) == 1
    assert monitor.idle and monitor.last == {} and set(seen) == {0}
    # an explicit selection of nothing watchable is the user's argument: it fails in setup, naming it
    with pytest.raises(LightningInterpError, match="`layers`"):
        quiet_trainer([make(layers="input")], max_epochs=1).fit(LinearOnly(), DigitsDataModule())


def test_multihead_attention_out_proj_never_fires_and_is_named():
    make, kind, blocks, *_ = MODELS["post-ln"]
    out_proj = "model.encoder.layers.0.self_attn.out_proj"
    monitors = [GradFlowMonitor(layers=[out_proj, blocks[1]]), NormStatsMonitor(layers=[out_proj, blocks[1]])]
    with pytest.warns(UserWarning, match="watch `model.encoder.layers.0.self_attn`") as record:
        L.seed_everything(0, verbose=False)
        quiet_trainer(monitors, max_epochs=1, log_every_n_steps=1).fit(DictClassifier(make), SyntheticDataModule(kind))
    assert sum("never ran" in str(w.message) for w in record) == 2
    assert f"gradflow/{blocks[1]}/grad_norm" in monitors[0].last
    # no activation statistic for it; its weights do get gradients (applied functionally), and those are logged
    assert [tag for tag in {**monitors[0].last, **monitors[1].last} if out_proj in tag] == [
        f"gradflow/{out_proj}/param_grad_norm"
    ]
    assert called_functionally(nn.TransformerEncoderLayer(8, 2)) == {"self_attn.out_proj": "self_attn"}


def test_chain_links_skip_functional_out_proj():
    class AttentionPool(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.ReLU()
            self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

    links, output = chain_links(AttentionPool(), ["act"])
    assert links[0].weight == "fc" and output != "attn.out_proj" and output is None


def test_conv1d_weight_matrix_and_chain():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(nf=5, nx=3)  # y = x @ W + b, W (3, 5)
    x = torch.randn(2, 3)
    assert torch.allclose(layer(x), x @ weight_matrix(layer).T + layer.bias)
    assert tuple(weight_matrix(layer).shape) == (5, 3)
    net = nn.Sequential(Conv1D(8, 4), nn.Tanh(), Conv1D(8, 8), nn.LayerNorm(8), nn.Tanh(), Conv1D(3, 8))
    links, output = chain_links(net, ["1", "4"])
    assert [(link.weight, link.norm) for link in links] == [("0", None), ("2", "3")] and output == "5"
    power = PowerIteration(seed=0)
    for _ in range(40):
        sigma = power.step("2", weight_matrix(net[2]))
    assert float(sigma) == pytest.approx(float(torch.linalg.matrix_norm(net[2].weight.detach(), 2)), rel=1e-3)
