"""Token attributions against Captum 0.9's layer methods, and SaliencyMonitor on Hugging Face models (BERT, GPT-2,
ViT) trained on dict batches: what lands in TensorBoard, whether the maps find the informative token, zero
interference, hook hygiene, and the warnings that replace crashes."""

from __future__ import annotations

import io
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from captum.attr import LayerGradientXActivation, LayerIntegratedGradients
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from helpers import assert_same_weights, count_hooks, weights_of
from lightning_interp.attribution import (
    default_baseline_token,
    embedding_attributions,
    input_embedding,
    saliency,
)
from lightning_interp.callbacks import SaliencyMonitor
from lightning_interp.errors import LightningInterpError
from lightning_interp.saliency_render import token_strip

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)

TOL = 1e-5
VOCAB, LENGTH, PAD, PLANTED = 50, 8, 0, 7
DEFAULT_METHODS = ("saliency", "smoothgrad", "integrated_gradients")
TOKEN_METHODS = ("saliency", "input_x_gradient", "smoothgrad", "integrated_gradients")


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    theirs = theirs.detach()
    return float((ours - theirs).abs().max() / theirs.abs().max())


# ---- models -------------------------------------------------------------------------------------------------
def tiny_bert(num_labels: int = 3) -> nn.Module:
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=num_labels)  # fmt: skip
    return BertForSequenceClassification(config)


def tiny_gpt2(num_labels: int = 3) -> nn.Module:
    config = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, num_labels=num_labels,
                        pad_token_id=PAD, bos_token_id=1, eos_token_id=1)  # fmt: skip
    return GPT2ForSequenceClassification(config)


class MaskedBag(nn.Module):
    """A small non-Hugging Face text classifier: an nn.Embedding, a tanh layer per token, a masked mean."""

    def __init__(self, num_labels: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 12, padding_idx=PAD)
        self.mix = nn.Linear(12, 12)
        self.head = nn.Linear(12, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.from_embeddings(self.embed(input_ids), attention_mask)

    def from_embeddings(self, embedded: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        hidden = torch.tanh(self.mix(embedded))
        mask = torch.ones(hidden.shape[:2]) if attention_mask is None else attention_mask.to(hidden.dtype)
        return self.head((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))


def _token_batch(batch: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids with right padding of different lengths, their attention mask, and targets."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, LENGTH + 2), generator=gen)
    lengths = torch.tensor([LENGTH + 2, 4, 7, LENGTH + 2, 3][:batch])
    mask = (torch.arange(LENGTH + 2)[None] < lengths[:, None]).long()
    ids[mask == 0] = PAD
    return ids, mask, torch.tensor([0, 1, 2, 1, 0][:batch])


@pytest.fixture(scope="module", params=["bert", "gpt2", "bag"])
def text_model(request) -> tuple[str, nn.Module]:
    torch.manual_seed({"bert": 0, "gpt2": 1, "bag": 2}[request.param])
    model = {"bert": tiny_bert, "gpt2": tiny_gpt2, "bag": MaskedBag}[request.param]()
    if request.param == "bag":
        with torch.no_grad():
            model.embed.weight.normal_()  # nn.Embedding's N(0, 1) init, padding row included (so pads matter)
    return request.param, model.eval()


def _captum_forward(model: nn.Module):
    hf = not isinstance(model, MaskedBag)
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits if hf else model(ids, mask)


# ---- the function against Captum ------------------------------------------------------------------------------
def test_saliency_and_input_x_gradient_match_captum_layer_methods(text_model):
    name, model = text_model
    ids, mask, target = _token_batch()
    layer = model.get_input_embeddings() if name != "bag" else model.embed
    forward, kwargs = _captum_forward(model), {"attention_mask": mask}
    gradient = LayerGradientXActivation(forward, layer, multiply_by_inputs=False).attribute(
        ids, target=target, additional_forward_args=(mask,)
    )
    ours = embedding_attributions(model, ids, target, "saliency", forward_kwargs=kwargs)
    assert ours.shape == ids.shape and rel_err(ours, gradient.norm(dim=-1)) <= TOL
    product = LayerGradientXActivation(forward, layer).attribute(ids, target=target, additional_forward_args=(mask,))
    ours = embedding_attributions(model, ids, target, "input_x_gradient", forward_kwargs=kwargs)
    assert rel_err(ours, product.sum(-1)) <= TOL


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_left", "riemann_middle", "riemann_right"])
def test_integrated_gradients_match_layer_integrated_gradients_with_pad_baseline(text_model, method):
    name, model = text_model
    ids, mask, target = _token_batch()
    layer = model.get_input_embeddings() if name != "bag" else model.embed
    theirs = LayerIntegratedGradients(_captum_forward(model), layer).attribute(
        ids, baselines=torch.full_like(ids, PAD), target=target, additional_forward_args=(mask,), n_steps=16,
        method=method,
    )  # fmt: skip
    ours = embedding_attributions(model, ids, target, "integrated_gradients", baseline_token_id=PAD,
                                  forward_kwargs={"attention_mask": mask}, n_steps=16, ig_method=method)  # fmt: skip
    assert rel_err(ours, theirs.sum(-1)) <= TOL
    if method == "gausslegendre":  # our defaults (baseline = the config's / embedding's pad token) = Captum's
        default = embedding_attributions(model, ids, target, "integrated_gradients",
                                         forward_kwargs={"attention_mask": mask}, n_steps=16)  # fmt: skip
        assert rel_err(default, theirs.sum(-1)) <= TOL


def test_integrated_gradients_from_a_mask_token_and_on_a_named_composite_layer():
    """``baseline_token_id`` another token, and ``embedding`` naming BERT's whole embedding block (word + position +
    type embeddings and LayerNorm) instead of the word embeddings: both as Captum computes them."""
    torch.manual_seed(3)
    model = tiny_bert().eval()
    ids, mask, target = _token_batch()
    forward = _captum_forward(model)
    theirs = LayerIntegratedGradients(forward, model.bert.embeddings).attribute(
        ids, baselines=torch.full_like(ids, 4), target=target, additional_forward_args=(mask,), n_steps=10
    )
    ours = embedding_attributions(model, ids, target, "integrated_gradients", embedding="bert.embeddings",
                                  baseline_token_id=4, forward_kwargs={"attention_mask": mask}, n_steps=10)  # fmt: skip
    assert rel_err(ours, theirs.sum(-1)) <= TOL


def test_chunked_passes_give_the_same_scores(text_model):
    _, model = text_model
    ids, mask, target = _token_batch()
    kwargs = {"attention_mask": mask}
    for method in ("integrated_gradients", "smoothgrad"):
        whole = embedding_attributions(model, ids, target, method, forward_kwargs=kwargs, n_steps=8, n_samples=4,
                                       generator=torch.Generator().manual_seed(0))  # fmt: skip
        chunked = embedding_attributions(model, ids, target, method, forward_kwargs=kwargs, n_steps=8, n_samples=4,
                                         generator=torch.Generator().manual_seed(0), internal_batch_size=3)  # fmt: skip
        assert rel_err(chunked, whole) <= TOL, method


def _embedding_grad(model: nn.Module, embedded: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d logit_target / d (word embeddings), by hand: the model run from embeddings (BERT's ``inputs_embeds``)."""
    embedded = embedded.detach().requires_grad_(True)
    if isinstance(model, MaskedBag):
        logits = model.from_embeddings(embedded, mask)
    else:
        logits = model(inputs_embeds=embedded, attention_mask=mask).logits
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), embedded)
    return grad


@pytest.mark.parametrize("which", ["bert", "bag"])
def test_smoothgrad_is_the_mean_gradient_norm_over_noisy_embeddings(which):
    torch.manual_seed(4)
    model = (tiny_bert() if which == "bert" else MaskedBag()).eval()
    ids, mask, target = _token_batch()
    embedded = (model.get_input_embeddings()(ids) if which == "bert" else model.embed(ids)).detach()
    samples = 5
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn((ids.shape[0], samples, *embedded.shape[1:]), generator=gen) * 0.05
    expected = torch.stack(
        [_embedding_grad(model, embedded + noise[:, s], mask, target).norm(dim=-1) for s in range(samples)]
    ).mean(0)
    ours = embedding_attributions(model, ids, target, "smoothgrad", forward_kwargs={"attention_mask": mask},
                                  n_samples=samples, noise=noise)  # fmt: skip
    assert rel_err(ours, expected) <= TOL
    # default noise: 0.15 x the range of the batch's embedding values, one (B, n, T, D) block from the generator
    stdev = 0.15 * float(embedded.max() - embedded.min())
    drawn = torch.randn(noise.shape, generator=torch.Generator().manual_seed(2)) * stdev
    defaults = embedding_attributions(model, ids, target, "smoothgrad", forward_kwargs={"attention_mask": mask},
                                      n_samples=samples, generator=torch.Generator().manual_seed(2))  # fmt: skip
    with_drawn = embedding_attributions(model, ids, target, "smoothgrad", forward_kwargs={"attention_mask": mask},
                                        n_samples=samples, noise=drawn)  # fmt: skip
    assert torch.equal(defaults, with_drawn)


def test_no_trace_on_the_model_and_global_rng_untouched(text_model):
    _, model = text_model
    ids, mask, target = _token_batch()
    before, rng = count_hooks(model), torch.get_rng_state()
    with torch.inference_mode():
        for method in TOKEN_METHODS:
            embedding_attributions(model, ids, target, method, forward_kwargs={"attention_mask": mask}, n_steps=4,
                                   n_samples=2, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert count_hooks(model) == before
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_hooks_removed_when_the_forward_raises():
    class Raising(MaskedBag):
        def forward(self, input_ids, attention_mask=None):
            embedded = self.embed(input_ids)
            if embedded.requires_grad:  # the attribution pass (the capture pass runs without gradients)
                raise RuntimeError("raised on purpose")
            return self.from_embeddings(embedded, attention_mask)

    model = Raising().eval()
    ids, mask, target = _token_batch()
    with pytest.raises(RuntimeError, match="on purpose"):
        embedding_attributions(model, ids, target, "saliency", forward_kwargs={"attention_mask": mask})
    assert count_hooks(model) == 0 and all(p.requires_grad for p in model.parameters())


def test_the_embedding_layer_and_baseline_are_found_by_role():
    wrapped = nn.Module()
    wrapped.model = tiny_bert()
    assert input_embedding(wrapped).name == "model.bert.embeddings.word_embeddings"
    assert input_embedding(tiny_gpt2()).name == "transformer.wte"
    assert input_embedding(MaskedBag()).name == "embed"
    assert input_embedding(wrapped, "model.bert.embeddings").module is wrapped.model.bert.embeddings
    assert default_baseline_token(wrapped) == 0  # BertConfig's pad_token_id
    assert default_baseline_token(tiny_gpt2()) == PAD
    bag = MaskedBag()
    assert default_baseline_token(bag, bag.embed) == PAD  # the embedding's padding_idx
    assert default_baseline_token(nn.Linear(2, 2), nn.Embedding(5, 2)) is None  # the zero embedding
    with pytest.raises(LightningInterpError, match=r"`embedding`.*'embed'"):
        embedding_attributions(bag, torch.ones(1, 3, dtype=torch.long), 0, "saliency", embedding="embeddings")
    with pytest.raises(LightningInterpError, match="baseline_token_id"):
        embedding_attributions(bag, torch.ones(1, 3, dtype=torch.long), 0, "integrated_gradients", baseline_token_id=-1)
    with pytest.raises(LightningInterpError, match="method"):
        embedding_attributions(bag, torch.ones(1, 3, dtype=torch.long), 0, "guided_backprop")


class Gated(nn.Module):
    """A float-input model with a per-example second argument (a feature mask), as an attention mask is for text."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.net(x * gate)


def test_forward_kwargs_of_the_float_input_functions_follow_each_point_as_captum_does():
    from captum.attr import GuidedBackprop, IntegratedGradients, NoiseTunnel, Saliency

    from lightning_interp.attribution import guided_backprop, integrated_gradients, smoothgrad

    torch.manual_seed(5)
    model = Gated().eval()
    gen = torch.Generator().manual_seed(0)
    x, gate = torch.randn((4, 6), generator=gen), (torch.rand((4, 6), generator=gen) > 0.3).float()
    target, kwargs = torch.tensor([0, 1, 2, 0]), {"gate": gate}
    theirs = Saliency(model).attribute(x, target, additional_forward_args=(gate,))
    assert rel_err(saliency(model, x, target, forward_kwargs=kwargs), theirs) <= TOL
    theirs = GuidedBackprop(model).attribute(x, target, additional_forward_args=(gate,))
    assert rel_err(guided_backprop(model, x, target, forward_kwargs=kwargs), theirs) <= TOL
    theirs = IntegratedGradients(model).attribute(x, target=target, additional_forward_args=(gate,), n_steps=20)
    ours = integrated_gradients(model, x, target, n_steps=20, forward_kwargs=kwargs, internal_batch_size=7)
    assert rel_err(ours, theirs) <= TOL
    torch.manual_seed(6)
    noise = torch.randn((4, 5, 6)) * 0.3
    torch.manual_seed(6)
    theirs = NoiseTunnel(Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=5, stdevs=0.3, target=target,
                                                    additional_forward_args=(gate,))  # fmt: skip
    ours = smoothgrad(model, x, target, 0.3, n_samples=5, noise=noise, forward_kwargs=kwargs, internal_batch_size=3)
    assert rel_err(ours, theirs) <= TOL
    with torch.inference_mode():  # extras made in inference mode are usable (cloned)
        made_there = {"gate": gate.clone()}
    assert rel_err(saliency(model, x, target, forward_kwargs=made_there), saliency(model, x, target, forward_kwargs=kwargs)) == 0


# ---- rendering -----------------------------------------------------------------------------------------------
def test_token_strip_colours_signed_and_unsigned_scores():
    def colours(picture: np.ndarray) -> tuple[int, int, int]:
        r, g, b = (picture[..., i].astype(int) for i in range(3))
        return int(((r - b) > 100).sum()), int(((b - r) > 100).sum()), int(((r > 200) & (g > 180) & (b < 80)).sum())

    signed = token_strip([["up", "down"]], [torch.tensor([1.0, -1.0])], signed=True, captions=[["label 1"]])
    red, blue, _ = colours(signed)
    assert red > 50 and blue > 50
    positive = token_strip([["up", "down"]], [torch.tensor([1.0, 0.5])], signed=True)
    assert colours(positive)[1] == 0  # no blue without a negative score
    unsigned = token_strip([["big", "small"]], [torch.tensor([1.0, 0.0])], signed=False)
    assert colours(unsigned)[2] > 50  # yellow = the largest score
    wrapped = token_strip([[f"t{i}" for i in range(90)]], [torch.rand(90)], signed=False, max_width=320)
    assert wrapped.shape[1] <= 320 + 20 and wrapped.shape[0] > 5 * 14  # lines wrapped


# ---- SaliencyMonitor on Hugging Face text models ----------------------------------------------------------------
class PlantedTokens(Dataset):
    """Label 1 when the token PLANTED occurs (once, at a random real position), 0 otherwise; right padding."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, LENGTH), generator=gen)
        self.ids[self.ids == PLANTED] = PLANTED + 1
        lengths = torch.randint(4, LENGTH + 1, (n,), generator=gen)
        self.mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
        self.labels = torch.randint(0, 2, (n,), generator=gen)
        position = (torch.rand(n, generator=gen) * lengths).long()
        rows = self.labels.bool().nonzero().flatten()
        self.ids[rows, position[rows]] = PLANTED
        self.ids[self.mask == 0] = PAD

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class TextClassifier(L.LightningModule):
    """A Hugging Face classifier in a LightningModule whose forward takes keyword arguments."""

    def __init__(self, make) -> None:
        super().__init__()
        self.model = make(num_labels=2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is several times faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fit_text(make, callbacks, tmp_path=None, n_train: int = 512, **kwargs):
    L.seed_everything(0, verbose=False)
    model = TextClassifier(make)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
        logger=TensorBoardLogger(str(tmp_path), name="", version="run") if tmp_path else False, **kwargs,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(PlantedTokens(n_train, 0), batch_size=32, shuffle=True),
                    DataLoader(PlantedTokens(128, 1), batch_size=64))  # fmt: skip
    model.warnings = [str(w.message) for w in record if "SaliencyMonitor" in str(w.message)]  # the monitor's own
    return model, trainer


def _images(path) -> dict[str, list]:
    acc = EventAccumulator(str(path), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    return {tag: acc.Images(tag) for tag in acc.Tags()["images"]}


def _planted_is_top(monitor: SaliencyMonitor, method: str) -> tuple[int, int]:
    """Among the followed examples with the planted token: how many have it as their top-|score| real token."""
    ids, labels, mask = monitor._batch.inputs, monitor._batch.targets, monitor._batch.attention_mask
    maps = monitor.last_maps[method]
    hits = [int(ids[i, maps[i].abs().masked_fill(mask[i] == 0, -1).argmax()] == PLANTED)
            for i in range(len(ids)) if labels[i] == 1]  # fmt: skip
    return sum(hits), len(hits)


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_monitor_at_defaults_on_hugging_face_text_classifiers(make, tmp_path):
    plain, _ = _fit_text(make, [])
    monitor = SaliencyMonitor(num_examples=16)
    hooks_before = count_hooks(TextClassifier(make))
    model, trainer = _fit_text(make, [monitor], tmp_path)
    assert_same_weights(weights_of(plain), weights_of(model))  # zero interference, bitwise
    assert count_hooks(model) == hooks_before and len(monitor.hooks) == 0
    assert monitor.dumps == 2 and not monitor.problems.counts and not model.warnings, model.warnings
    images = _images(tmp_path / "run")
    assert sorted(images) == sorted(f"saliency/{m}/examples" for m in DEFAULT_METHODS)
    for tag, events in images.items():
        assert [e.step for e in events] == [16, 32], tag
        picture = np.asarray(Image.open(io.BytesIO(events[-1].encoded_image_string)).convert("RGB"))
        assert picture.shape[0] > 16 * 20 and len(np.unique(picture.reshape(-1, 3), axis=0)) > 20, tag
    assert all(maps.shape == monitor._batch.inputs.shape for maps in monitor.last_maps.values())
    # the maps are meaningful: Integrated Gradients puts its largest score on the planted token
    hits, positives = _planted_is_top(monitor, "integrated_gradients")
    assert positives >= 6 and hits >= positives - 1, (hits, positives)
    # and they are the public function's (the same baseline, quadrature and seeded noise)
    model.eval()
    ids, mask, labels = monitor._batch.inputs, monitor._batch.attention_mask, monitor._batch.targets
    forward = lambda input_ids, attention_mask: model(input_ids, attention_mask)  # noqa: E731
    layer = model.model.get_input_embeddings()
    for method in DEFAULT_METHODS:
        want = embedding_attributions(forward, ids, labels, method, embedding=layer, baseline_token_id=PAD,
                                      forward_kwargs={"attention_mask": mask}, n_steps=monitor.ig_steps,
                                      n_samples=monitor.smoothgrad_samples,
                                      generator=torch.Generator().manual_seed(monitor.seed))  # fmt: skip
        assert rel_err(monitor.last_maps[method], want) <= TOL, method


def test_the_planted_token_is_not_found_by_an_untrained_model():
    """The check above can fail: before training, IG's top token is the planted one for few examples."""
    L.seed_everything(0, verbose=False)
    model = TextClassifier(tiny_bert).eval()
    data = PlantedTokens(32, 1)
    positives = data.labels.bool().nonzero().flatten()[:8]
    ids, mask = data.ids[positives], data.mask[positives]
    scores = embedding_attributions(model, ids, 1, "integrated_gradients", forward_kwargs={"attention_mask": mask},
                                    n_steps=6)  # fmt: skip
    top = scores.abs().masked_fill(mask == 0, -1).argmax(1)
    hits = int((ids.gather(1, top[:, None]) == PLANTED).sum())
    assert len(positives) == 8 and hits < 7, hits


def test_token_monitor_every_method_randomization_check_and_token_text(tmp_path):
    seen: list[int] = []

    def id_to_token(token_id: int) -> str:
        seen.append(token_id)
        return f"w{token_id}"

    monitor = SaliencyMonitor(methods=("saliency", "input_x_gradient", "smoothgrad", "integrated_gradients",
                                       "guided_backprop"), num_examples=6, randomization_check=True,
                              id_to_token=id_to_token)  # fmt: skip
    model, trainer = _fit_text(tiny_bert, [monitor], tmp_path, n_train=64)
    messages = model.warnings
    assert len(messages) == 1 and "guided backprop" in messages[0] and "`methods`" in messages[0]
    assert sorted(monitor.last_maps) == sorted(TOKEN_METHODS)
    assert sorted(_images(tmp_path / "run")) == sorted(f"saliency/{m}/examples" for m in TOKEN_METHODS)
    for method in TOKEN_METHODS:
        assert -1.0 <= float(trainer.callback_metrics[f"saliency/{method}/randomization_rank_corr"]) <= 1.0
    # every real token was drawn as text, the padding (id 0, attention_mask 0) never
    mask = monitor._batch.attention_mask.bool()
    real = monitor._batch.inputs[mask]
    assert PAD not in seen and set(seen) == set(real.tolist())


def test_tokenizer_text_is_drawn(tmp_path):
    class Tokenizer:
        def __init__(self) -> None:
            self.calls = 0

        def convert_ids_to_tokens(self, ids):
            self.calls += 1
            return f"tok{ids}" if isinstance(ids, int) else [f"tok{i}" for i in ids]

    tokenizer = Tokenizer()
    monitor = SaliencyMonitor(methods=("saliency",), num_examples=4, tokenizer=tokenizer)
    _fit_text(tiny_bert, [monitor], tmp_path, n_train=32)
    assert tokenizer.calls == 2 * int(monitor._batch.attention_mask.sum())  # two dumps, real tokens only
    with pytest.raises(LightningInterpError, match="tokenizer"):
        SaliencyMonitor(tokenizer=object())
    with pytest.raises(LightningInterpError, match="one of"):
        SaliencyMonitor(tokenizer=tokenizer, id_to_token=str)


class OneHotText(L.LightningModule):
    """Token ids turned into one-hot vectors: no embedding module anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(VOCAB, 2)

    def forward(self, input_ids, attention_mask=None):
        return self.head(nn.functional.one_hot(input_ids, VOCAB).float().sum(1))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["input_ids"]), batch["labels"])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_quiet(model, monitor, tmp_path, loader):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        L.Trainer(accelerator="cpu", max_epochs=1, callbacks=[monitor], enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                  logger=TensorBoardLogger(str(tmp_path), name="", version="run"),
                  ).fit(model, loader, loader)  # fmt: skip
    return [str(w.message) for w in record if "SaliencyMonitor" in str(w.message)]


def test_token_ids_without_an_embedding_layer_warn_once_naming_the_argument(tmp_path):
    monitor = SaliencyMonitor()
    messages = _fit_quiet(OneHotText(), monitor, tmp_path, DataLoader(PlantedTokens(64, 0), batch_size=32))
    assert len(messages) == 1 and "`embedding_layer=`" in messages[0]
    assert monitor.dumps == 0 and monitor.last_maps == {}


def test_a_dict_batch_it_cannot_read_warns_once_naming_batch_adapter(tmp_path):
    class Renamed(PlantedTokens):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {"tokens": item["input_ids"], "labels": item["labels"]}

    class OnTokens(OneHotText):
        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch["tokens"]), batch["labels"])

    monitor = SaliencyMonitor()
    messages = _fit_quiet(OnTokens(), monitor, tmp_path, DataLoader(Renamed(64, 0), batch_size=32))
    assert len(messages) == 1 and "batch_adapter" in messages[0]
    assert monitor.dumps == 0


def test_an_explicit_bad_embedding_layer_fails_at_setup(tmp_path):
    monitor = SaliencyMonitor(embedding_layer="model.bert.embedings")
    with pytest.raises(LightningInterpError, match=r"`embedding_layer`.*word_embeddings"):
        _fit_text(tiny_bert, [monitor], tmp_path, n_train=32)
    with pytest.raises(LightningInterpError, match="baseline_token_id"):
        SaliencyMonitor(baseline_token_id=-2)


def test_an_explicit_embedding_layer_and_given_dict_inputs(tmp_path):
    """``embedding_layer`` names BERT's whole embedding block; ``inputs`` is a dict batch with its mask."""
    data = PlantedTokens(4, 5)
    given = {"input_ids": data.ids, "attention_mask": data.mask, "labels": data.labels}
    monitor = SaliencyMonitor(methods=("integrated_gradients",), embedding_layer="model.bert.embeddings",
                              baseline_token_id=3, inputs=given)  # fmt: skip
    model, _ = _fit_text(tiny_bert, [monitor], tmp_path, n_train=32)
    model.eval()
    forward = lambda ids, mask: model(ids, mask).logits  # noqa: E731
    theirs = LayerIntegratedGradients(forward, model.model.bert.embeddings).attribute(
        data.ids, baselines=torch.full_like(data.ids, 3), target=data.labels, additional_forward_args=(data.mask,),
        n_steps=monitor.ig_steps,
    )  # fmt: skip
    assert rel_err(monitor.last_maps["integrated_gradients"], theirs.sum(-1)) <= TOL


# ---- ViT on pixel_values dict batches ----------------------------------------------------------------------------
class Pictures(Dataset):
    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, 3, (n,), generator=gen)
        self.images = torch.rand((n, 3, 16, 16), generator=gen) * 0.2
        for i, label in enumerate(self.labels):  # a bright quadrant per class
            r, c = divmod(int(label), 2)
            self.images[i, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] += 0.8

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


class ImageClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32, num_labels=3)  # fmt: skip
        self.model = ViTForImageClassification(config)

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_vit_on_pixel_values_dict_batches_gets_image_grids(tmp_path):
    monitor = SaliencyMonitor(methods=("saliency", "integrated_gradients", "guided_backprop"), num_examples=3,
                              ig_steps=3, randomization_check=True)  # fmt: skip
    L.seed_everything(0, verbose=False)
    model = ImageClassifier()
    loader = DataLoader(Pictures(48), batch_size=16)
    messages = _fit_quiet(model, monitor, tmp_path, loader)
    assert messages == [] and monitor.dumps == 1
    images = _images(tmp_path / "run")
    assert sorted(images) == sorted(f"saliency/{m}/examples" for m in monitor.methods)
    (event,) = images["saliency/saliency/examples"]
    # three rows of 64-pixel cells (16x16 upscaled 4x) under a title row; caption, input, heatmap, overlay
    assert 3 * 64 < event.height < 3 * 64 + 40 and event.width > 3 * 64
    assert monitor.last_maps["saliency"].shape == (3, 3, 16, 16)
    model.eval()
    x, y = monitor._examples
    want = saliency(lambda pixels: model(pixels).logits, x, y)
    assert rel_err(monitor.last_maps["saliency"], want) <= TOL
