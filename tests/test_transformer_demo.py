"""The digits transformer (Post-LN / Pre-LN / Pre-RMSNorm / none) and ``lightning-interp demo --model
transformer``: the blocks against torch's own ``nn.TransformerEncoder``, the layers the callbacks see, zero
interference of the whole suite, and the command line end to end."""

from __future__ import annotations

import re

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_interp.cli import main
from lightning_interp.compare import compare_runs
from lightning_interp.layers import normalization_layers, select_layers
from lightning_interp.models import TRANSFORMER_NORM_VARIANTS, DigitsTransformer
from tests.helpers import TAG_FAMILIES, assert_same_weights, count_hooks, every_callback, fit, weights_of

DEPTH = 3


def torch_reference(model: DigitsTransformer) -> nn.TransformerEncoder:
    """torch's encoder (``norm_first`` for Pre-LN) carrying ``model``'s block and final-norm weights."""
    width, heads = model.hparams.width, model.hparams.heads
    layer = nn.TransformerEncoderLayer(
        width, heads, model.hparams.mlp_ratio * width, dropout=0.0, activation="gelu", batch_first=True,
        norm_first=model.norm != "postln",
    )  # fmt: skip
    final = nn.LayerNorm(width) if model.norm == "preln" else None
    encoder = nn.TransformerEncoder(layer, len(model.net.blocks), norm=final, enable_nested_tensor=False)
    with torch.no_grad():
        for ours, theirs in zip(model.net.blocks, encoder.layers):
            theirs.self_attn.in_proj_weight.copy_(ours.attn.qkv.weight)
            theirs.self_attn.in_proj_bias.copy_(ours.attn.qkv.bias)
            theirs.self_attn.out_proj.load_state_dict(ours.attn.proj.state_dict())
            theirs.linear1.load_state_dict(ours.mlp.fc1.state_dict())
            theirs.linear2.load_state_dict(ours.mlp.fc2.state_dict())
            theirs.norm1.load_state_dict(ours.norm1.state_dict())
            theirs.norm2.load_state_dict(ours.norm2.state_dict())
        if final is not None:
            final.load_state_dict(model.net.final_norm.state_dict())
    return encoder


@pytest.mark.parametrize("norm", ["postln", "preln"])
def test_forward_equals_torch_transformer_encoder(norm):
    torch.manual_seed(0)
    model = DigitsTransformer(norm=norm, depth=DEPTH).eval()
    with torch.no_grad():  # non-trivial norm weights, so that a norm in the wrong place shows
        for layer in normalization_layers(model):
            layer.module.weight.uniform_(0.5, 1.5)
            layer.module.bias.uniform_(-0.5, 0.5)
    images = torch.rand(5, 1, 8, 8)
    encoder = torch_reference(model).train()  # train mode (dropout 0): the plain path, not the fast kernel
    tokens = model.net.embed.proj(images.reshape(5, 8, 8)) + model.net.embed.position  # row r is token r
    expected = model.net.head(encoder(tokens).mean(dim=1))
    with torch.no_grad():
        assert torch.allclose(model(images), expected, atol=1e-5)
        if norm == "preln":  # and the final norm is applied: without it the result differs
            hidden = tokens
            for layer in encoder.layers:
                hidden = layer(hidden)
            assert not torch.allclose(model.net.head(hidden.mean(dim=1)), expected, atol=1e-3)


def test_rmsnorm_and_none_blocks_by_hand():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 64)
    for norm in ("rmsnorm", "none"):
        block = DigitsTransformer(norm=norm, depth=1).net.blocks[0]
        eps = torch.finfo(x.dtype).eps  # nn.RMSNorm's default

        def rms(h, norm=norm, eps=eps):
            return h / h.pow(2).mean(-1, keepdim=True).add(eps).sqrt() if norm == "rmsnorm" else h

        h = x + block.attn(rms(x))
        expected = h + block.mlp.fc2(nn.functional.gelu(block.mlp.fc1(rms(h))))
        with torch.no_grad():
            assert torch.allclose(block(x), expected, atol=1e-5), norm


@pytest.mark.parametrize("norm", TRANSFORMER_NORM_VARIANTS)
def test_variants_layers_and_norms(norm):
    model = DigitsTransformer(norm=norm, depth=DEPTH)
    assert model(torch.zeros(7, 1, 8, 8)).shape == (7, 10)
    assert [layer.name for layer in select_layers(model)] == ["input", "net.embed"] + [
        f"net.blocks.{i}" for i in range(DEPTH)
    ]
    norms = {layer.name: type(layer.module) for layer in normalization_layers(model)}
    per_block = {f"net.blocks.{i}.norm{j}" for i in range(DEPTH) for j in (1, 2)}
    if norm == "postln":
        assert set(norms) == per_block and set(norms.values()) == {nn.LayerNorm}
        assert isinstance(model.net.final_norm, nn.Identity)
    elif norm == "preln":
        assert set(norms) == per_block | {"net.final_norm"} and set(norms.values()) == {nn.LayerNorm}
    elif norm == "rmsnorm":
        assert set(norms) == per_block | {"net.final_norm"} and set(norms.values()) == {nn.RMSNorm}
    else:
        assert norms == {} and isinstance(model.net.final_norm, nn.Identity)
    # the head is the last nn.Linear (RepresenterMonitor's default layer)
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][-1] is model.net.head


def test_bad_arguments():
    from lightning_interp.errors import LightningInterpError

    with pytest.raises(LightningInterpError, match="`norm`"):
        DigitsTransformer(norm="batch")
    with pytest.raises(LightningInterpError, match="`width` to be a multiple of `heads`"):
        DigitsTransformer(width=30, heads=4)


def test_warmup_schedule():
    model = DigitsTransformer(lr=1e-3, warmup_steps=4)
    config = model.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_zero_interference_of_every_callback_on_pre_ln(tmp_path, one_torch_thread):
    def model_fn():
        # dropout: a draw from the global RNG by a callback would change the weights
        return DigitsTransformer(norm="preln", dropout=0.1, warmup_steps=10)

    plain, _ = fit([], model_fn, max_epochs=2, log_every_n_steps=3)
    ours = every_callback(representer_examples=200)
    watched, trainer = fit(
        ours, model_fn, max_epochs=2, log_every_n_steps=3, logger=TensorBoardLogger(str(tmp_path), name="t")
    )
    assert_same_weights(weights_of(plain), weights_of(watched))
    assert count_hooks(watched) == 0 and all(len(c.hooks) == 0 for c in ours)
    for family in TAG_FAMILIES:  # every callback did its work on this model
        assert any(k.startswith(family) for k in trainer.callback_metrics), family
    assert "probe/val_acc/net.blocks.7" in trainer.callback_metrics
    assert "norm/net.final_norm/effective_gain" in trainer.callback_metrics


def test_demo_command_trains_the_transformer_variants(tmp_path, capsys):
    # an earlier CNN run in the same folder: the transformer's comparison must not list it, nor the CNN demo's
    # comparison (exclude=("transformer",)) the transformer's runs
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "batchnorm")) as writer:
        writer.add_scalar("val_acc", 0.5, 0)
    status = main(["demo", "--model", "transformer", "--epochs", "1", "--variants", "post-ln,none",
                   "--out", str(tmp_path), "--no-progress-bar", "--warmup-steps", "3"])  # fmt: skip
    printed = capsys.readouterr().out
    assert status == 0
    assert "DigitsTransformer(norm='postln', depth=12, lr=0.003, warmup_steps=3), 1 epochs" in printed
    layers = ["input", "net.embed"] + [f"net.blocks.{i}" for i in range(12)]
    table = printed[printed.index("| layer | postln | none |") :]
    assert [line.split(" | ")[0][2:] for line in table.splitlines()[2:16]] == layers
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (postln|none) \| (.*) \|$", printed, re.M)}
    assert set(rows) == {"postln", "none"}  # the compare report, transformer runs only
    assert f"tensorboard --logdir {tmp_path / 'transformer'} " in printed
    assert (tmp_path / "transformer" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    runs = compare_runs(tmp_path / "transformer")
    assert [run.name for run in runs] == ["none", "postln"]
    for run in runs:
        assert list(run.probe_acc) == layers  # in the model's order, net.embed before the blocks
        assert len(run.val_acc_curve) == 1 and run.median_cum_product > 0
    assert runs[0].mean_effective_gain != runs[0].mean_effective_gain  # no normalization: nan
    assert runs[1].mean_effective_gain > 0
    # the per-layer numbers of the two tables agree
    probe_rows = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in table.splitlines()[2:16]}
    assert [f"{v:.2f}" for v in runs[1].probe_acc.values()] == [f"{float(probe_rows[n]):.2f}" for n in layers]
    assert [run.name for run in compare_runs(tmp_path, exclude=("transformer",))] == ["batchnorm"]


def test_demo_rejects_variants_of_the_other_model(capsys):
    for argv in (["--model", "transformer", "--variants", "batchnorm"], ["--variants", "preln"]):
        with pytest.raises(SystemExit) as exit:
            main(["demo", *argv])
        assert exit.value.code == 2
        assert "unknown" in capsys.readouterr().err
