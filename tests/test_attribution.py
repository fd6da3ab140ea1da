"""Gradient attributions against Captum 0.9 (the independent reference), closed-form identities, and no-trace checks."""

from __future__ import annotations

import warnings

import pytest
import torch
from captum.attr import GuidedBackprop, InputXGradient, IntegratedGradients, NoiseTunnel, Saliency
from torch import nn

from lightning_interp.attribution import (
    guided_backprop,
    input_x_gradient,
    integrated_gradients,
    saliency,
    smoothgrad,
)
from lightning_interp.errors import LightningInterpError
from lightning_interp.hooks import count_hooks
from lightning_interp.models import DeepMLP, DigitsCNN

TOL = 1e-5


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    theirs = theirs.detach()
    return float((ours - theirs).abs().max() / theirs.abs().max())


def _trained_like(make_model, seed: int) -> nn.Module:  # type: ignore[no-untyped-def]
    """Random weights drawn after seeding (not in whatever state earlier tests left the global RNG) and non-trivial
    BatchNorm running statistics, then eval mode."""
    torch.manual_seed(seed)
    model = make_model()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    return _trained_like(lambda: DigitsCNN(norm="batch", dropout=0.3), 0)


@pytest.fixture(scope="module")
def mlp() -> nn.Module:
    return _trained_like(lambda: DeepMLP(depth=3, width=32, norm="batch", activation="relu"), 1)


@pytest.fixture(scope="module")
def tanh_mlp() -> nn.Module:
    torch.manual_seed(2)
    return DeepMLP(depth=3, width=32, norm="none", activation="tanh").eval()


def _inputs(model: nn.Module, batch: int = 6, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 8, 8) if isinstance(model, DigitsCNN) else (64,)
    return torch.rand((batch, *shape), generator=gen)


TARGETS = [3, [0, 1, 2, 3, 4, 9], torch.tensor([9, 8, 7, 6, 5, 4])]


@pytest.mark.parametrize("which", ["cnn", "mlp"])
@pytest.mark.parametrize("target", TARGETS, ids=["int", "list", "tensor"])
def test_saliency_and_input_x_gradient_match_captum(which, target, request):
    model = request.getfixturevalue(which)
    x = _inputs(model)
    for abs_ in (True, False):
        assert rel_err(saliency(model, x, target, abs=abs_), Saliency(model).attribute(x, target, abs=abs_)) <= TOL
    assert rel_err(input_x_gradient(model, x, target), InputXGradient(model).attribute(x, target)) <= TOL


@pytest.mark.parametrize("which", ["cnn", "mlp"])
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle"])
def test_integrated_gradients_match_captum(which, method, request):
    model = request.getfixturevalue(which)
    x = _inputs(model)
    target = [1, 2, 3, 4, 5, 6]
    baselines = torch.full_like(x, 0.25)
    ours, delta = integrated_gradients(
        model, x, target, baselines=baselines, n_steps=20, method=method, internal_batch_size=7,
        return_convergence_delta=True,
    )  # fmt: skip
    theirs, their_delta = IntegratedGradients(model).attribute(
        x, baselines=baselines, target=target, n_steps=20, method=method, return_convergence_delta=True
    )
    assert rel_err(ours, theirs) <= TOL
    assert torch.allclose(delta, their_delta.to(delta.dtype), atol=1e-4 * float(theirs.abs().max()))


def test_trapezoid_is_textbook_and_differs_from_captum_by_n_over_n_minus_1(cnn):
    x, n = _inputs(cnn), 10
    ours = integrated_gradients(cnn, x, 4, n_steps=n, method="riemann_trapezoid")
    theirs = IntegratedGradients(cnn).attribute(x, target=4, n_steps=n, method="riemann_trapezoid")
    # Captum weights the trapezoid 1/n (summing to (n-1)/n); ours 1/(n-1), the textbook rule
    assert rel_err(ours * (n - 1) / n, theirs) <= TOL


def test_integrated_gradients_defaults_match_captum(cnn):
    x = _inputs(cnn, batch=4)
    assert rel_err(integrated_gradients(cnn, x, 2), IntegratedGradients(cnn).attribute(x, target=2)) <= TOL


@pytest.mark.parametrize("which", ["cnn", "mlp"])
@pytest.mark.parametrize("squared", [False, True])
def test_smoothgrad_matches_noise_tunnel_with_identical_noise(which, squared, request):
    model = request.getfixturevalue(which)
    x, k, sigma, target = _inputs(model, batch=4), 6, 0.2, [0, 3, 5, 7]
    torch.manual_seed(11)
    theirs = NoiseTunnel(Saliency(model)).attribute(
        x, nt_type="smoothgrad_sq" if squared else "smoothgrad", nt_samples=k, stdevs=sigma, target=target
    )
    torch.manual_seed(11)  # NoiseTunnel's draw: one normal sample per (example, copy), example-major
    noise = (torch.randn((x.shape[0] * k, *x.shape[1:])) * sigma).reshape(x.shape[0], k, *x.shape[1:])
    ours = smoothgrad(model, x, target, stdev=sigma, n_samples=k, squared=squared, noise=noise, internal_batch_size=5)
    assert rel_err(ours, theirs) <= TOL


@pytest.mark.parametrize("which", ["cnn", "mlp"])
def test_guided_backprop_matches_captum(which, request):
    model = request.getfixturevalue(which)
    x = _inputs(model)
    target = torch.tensor([0, 1, 2, 7, 8, 9])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = GuidedBackprop(model).attribute(x, target=target)
    ours = guided_backprop(model, x, target)
    assert rel_err(ours, theirs) <= TOL
    assert not torch.allclose(ours, saliency(model, x, target, abs=False))  # the guidance changes something


def _completeness(model: nn.Module, x: torch.Tensor, target) -> tuple[float, float]:
    """Per-example |sum(attr) - (F(x) - F(0))| / |F(x) - F(0)|: (median, aggregate sum|delta| / sum|gap|)."""
    attr, delta = integrated_gradients(model, x, target, n_steps=50, return_convergence_delta=True)
    t = torch.as_tensor(target).expand(x.shape[0]).view(-1, 1)
    with torch.no_grad():
        gap = (model(x).gather(1, t) - model(torch.zeros_like(x)).gather(1, t)).squeeze(1)
    # the delta is recomputed by hand from the attributions, not trusted from the function
    assert torch.allclose(attr.reshape(len(x), -1).sum(1) - gap, delta, atol=1e-4)
    ratio = delta.abs() / gap.abs()
    return float(ratio.median()), float(delta.abs().sum() / gap.abs().sum())


def test_ig_completeness_relu_cnn(cnn):
    from lightning_interp.data import load_digits_tensors

    images, labels = load_digits_tensors()
    x, y = images[:12], labels[:12]
    median, aggregate = _completeness(cnn, x, y)
    assert median <= 2e-2 and aggregate <= 2e-2


def test_ig_completeness_smooth_network_in_float64(tanh_mlp):
    model = tanh_mlp.double()
    try:
        x = _inputs(model, batch=8, seed=6).double()
        assert max(_completeness(model, x, 3)) <= 1e-5
    finally:
        model.float()


def test_ig_completeness_smooth_network_in_float32(tanh_mlp):
    x = _inputs(tanh_mlp, batch=8, seed=6)
    assert max(_completeness(tanh_mlp, x, 3)) <= 1e-5


# ---- no trace, any grad mode --------------------------------------------------------------------------------


ALL = {
    "saliency": lambda m, x, t: saliency(m, x, t),
    "input_x_gradient": lambda m, x, t: input_x_gradient(m, x, t),
    "smoothgrad": lambda m, x, t: smoothgrad(m, x, t, 0.1, n_samples=3, generator=torch.Generator().manual_seed(0)),
    "integrated_gradients": lambda m, x, t: integrated_gradients(m, x, t, n_steps=4),
    "guided_backprop": lambda m, x, t: guided_backprop(m, x, t),
}


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_works_under_no_grad_and_inference_mode(cnn, name, mode):
    x = _inputs(cnn)
    expected = ALL[name](cnn, x, 2)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        x_inner = x.clone()  # an inference tensor under inference_mode, like Lightning's batches
        got = ALL[name](cnn, x_inner, 2)
    assert torch.equal(got, expected)
    assert got.shape == x.shape


@pytest.mark.parametrize("name", sorted(ALL))
def test_no_trace_on_model(cnn, name):
    for p in cnn.parameters():
        p.grad = None
    cnn.net.fc2.weight.requires_grad_(False)  # a caller's mixed flags must come back as they were
    flags = [p.requires_grad for p in cnn.parameters()]
    state = {k: v.clone() for k, v in cnn.state_dict().items()}
    rng = torch.get_rng_state()
    try:
        ALL[name](cnn, _inputs(cnn), 2)
        assert [p.requires_grad for p in cnn.parameters()] == flags
        assert all(p.grad is None for p in cnn.parameters())
        assert count_hooks(cnn) == 0
        assert torch.equal(torch.get_rng_state(), rng)  # smoothgrad draws from its own generator
        assert all(torch.equal(v, state[k]) for k, v in cnn.state_dict().items())
    finally:
        cnn.net.fc2.weight.requires_grad_(True)


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.relu(self.fc(x))
        raise RuntimeError("boom")


@pytest.mark.parametrize("name", sorted(ALL))
def test_flags_and_hooks_restored_when_forward_raises(name):
    model = Exploding()
    model.fc.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        ALL[name](model, torch.randn(2, 4), 0)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert count_hooks(model) == 0


@pytest.mark.parametrize("name", sorted(ALL))
def test_target_out_of_range_is_a_clear_error(mlp, name):
    with pytest.raises(LightningInterpError, match="target"):
        ALL[name](mlp, _inputs(mlp), 10)
    with pytest.raises(LightningInterpError, match="target"):
        ALL[name](mlp, _inputs(mlp), -1)
    assert count_hooks(mlp) == 0


def test_bad_arguments():
    net = nn.Linear(3, 2)
    x = torch.randn(2, 3)
    with pytest.raises(LightningInterpError, match="method"):
        integrated_gradients(net, x, 0, method="simpson")
    with pytest.raises(LightningInterpError, match="stdev"):
        smoothgrad(net, x, 0, stdev=0.0)
    with pytest.raises(LightningInterpError, match="noise"):
        smoothgrad(net, x, 0, stdev=0.1, n_samples=2, noise=torch.zeros(2, 3, 3))
    with pytest.raises(LightningInterpError, match="target"):
        saliency(net, x, [0, 1, 1])
    with pytest.raises(LightningInterpError, match="inputs"):
        saliency(net, torch.ones(2, 3, dtype=torch.long), 0)


def test_chunking_does_not_change_results(cnn):
    x = _inputs(cnn, batch=5)
    whole = integrated_gradients(cnn, x, 1, n_steps=8, internal_batch_size=1000)
    pieces = integrated_gradients(cnn, x, 1, n_steps=8, internal_batch_size=3)
    # chunks change conv kernels' summation order: compare on the scale of the map, as for Captum equivalence
    assert float((whole - pieces).abs().max()) <= 1e-5 * float(whole.abs().max())


def test_smoothgrad_generator_is_reproducible_and_global_rng_untouched(cnn):
    x = _inputs(cnn, batch=3)
    rng = torch.get_rng_state()
    a = smoothgrad(cnn, x, 1, 0.2, n_samples=4, generator=torch.Generator().manual_seed(5))
    b = smoothgrad(cnn, x, 1, 0.2, n_samples=4, generator=torch.Generator().manual_seed(5))
    c = smoothgrad(cnn, x, 1, 0.2, n_samples=4, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), rng)


def test_smoothgrad_seeded_noise_does_not_depend_on_the_pass_size():
    """A seed gives one (n_samples, ...) block of noise per example, in example order, whatever the pass size:
    the result equals the mean |gradient| at x_e + stdev * block_e[s], each block drawn here from the same seed
    and each gradient taken by autograd one noisy copy at a time."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    x, target, stdev, samples = torch.randn(7, 5), [0, 1, 2, 0, 1, 2, 0], 0.3, 6
    gen = torch.Generator().manual_seed(11)
    expected = torch.zeros_like(x)
    for e in range(x.shape[0]):
        block = torch.randn((samples, 5), generator=gen) * stdev
        for s in range(samples):
            leaf = (x[e] + block[s]).unsqueeze(0).requires_grad_(True)
            (grad,) = torch.autograd.grad(net(leaf)[0, target[e]], leaf)
            expected[e] += grad[0].abs() / samples
    for pass_size in (None, 1, 4, 6, 13, 42):  # passes that cut examples' blocks anywhere, and one pass for all
        got = smoothgrad(net, x, target, stdev, n_samples=samples, generator=torch.Generator().manual_seed(11),
                         internal_batch_size=pass_size)  # fmt: skip
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_saliency_of_linear_model_is_its_weight_row():
    """Closed form: for F(x) = W x + b, dF_t/dx = W[t] for every input."""
    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    got = saliency(net, x, [2, 0, 1, 2], abs=False)
    assert torch.allclose(got, net.weight.detach()[[2, 0, 1, 2]])
    ig = integrated_gradients(net, x, [2, 0, 1, 2], n_steps=3)
    assert torch.allclose(ig, x * net.weight.detach()[[2, 0, 1, 2]], atol=1e-6)


def test_default_passes_follow_the_bytes_the_model_saves(monkeypatch):
    """Frozen Linear(300, 10) -> ReLU -> Linear(10, 3): the backward to the input keeps the ReLU output, 10 floats
    = 40 bytes per point (and the weights, which are parameters and not counted); selecting the target class adds
    the 3 logits and an int64 index: 60 bytes per point. With a budget of 1,500 bytes per pass: a first pass of
    32 points, then the other 68 in the fewest equal passes of at most 25 points: 3 passes of 23 (the last 22)."""
    import lightning_interp.attribution._gradients as core

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(300, 10), nn.ReLU(), nn.Linear(10, 3))
    x = torch.randn(100, 300)
    with core.gradient_scope(net):
        with core.saved_bytes(net) as count:
            net(x.clone().requires_grad_(True))
        assert count[0] == 100 * 10 * 4
        monkeypatch.setattr(core, "_MAX_BYTES_PER_PASS", 1500)
        parts = list(core.input_gradients(net, 100, lambda a, b: x[a:b], lambda a, b: torch.full((b - a,), 2)))
    assert [(a, b) for a, b, _ in parts] == [(0, 32), (32, 55), (55, 78), (78, 100)]
    whole = saliency(net, x, 2, abs=False, internal_batch_size=100)
    torch.testing.assert_close(torch.cat([g for _, _, g in parts]), whole, rtol=1e-5, atol=1e-7)


def test_default_passes_are_bounded_for_large_activations():
    """A point whose saved activations take 1 MB (+ 16 bytes for the 2 logits and the index) gets passes of at
    most 2**16 / sqrt(2**20 + 16) = 63.99 -> 63 points: the 168 points after the first 32 go in 3 passes of 56.
    Whatever the model, a pass keeps at most 256 MB and 1,024 points."""
    import lightning_interp.attribution._gradients as core

    net = nn.Sequential(nn.Linear(4, 2**18), nn.ReLU(), nn.Linear(2**18, 2))  # ReLU output: 2**18 floats = 1 MB
    x = torch.randn(200, 4)
    with core.gradient_scope(net):
        targets = lambda a, b: torch.zeros(b - a, dtype=torch.long)  # noqa: E731
        parts = list(core.input_gradients(net, 200, lambda a, b: x[a:b], targets))
    assert [(a, b) for a, b, _ in parts] == [(0, 32), (32, 88), (88, 144), (144, 200)]
    with core.gradient_scope(net):  # up to 48 points go in one pass rather than 32 + a small remainder
        parts = list(core.input_gradients(net, 48, lambda a, b: x[a:b], targets))
    assert [(a, b) for a, b, _ in parts] == [(0, 48)]
    assert core.points_per_pass(1) == 1024 and core.points_per_pass(2**40) == 1
    assert core.points_per_pass(2**10) == 1024 and core.points_per_pass(2**14) == 2**16 // 2**7  # sqrt rule
    assert core.points_per_pass(2**26) == 4  # 64 MB per point: the 256 MB bound, not 2**16 / 2**13 = 8
    many = [core.points_per_pass(b) for b in (2**k for k in range(41))]
    assert all(a >= b for a, b in zip(many, many[1:]))  # fewer points per pass as each point keeps more
    cuda = torch.device("cuda")  # on an accelerator: 1 GB a pass, at most 4,096 points (no CUDA needed to ask)
    assert core.points_per_pass(2**20, cuda) == 1024 and core.points_per_pass(1, cuda) == 4096
    assert core.points_per_pass(2**31, cuda) == 1 and core.points_per_pass(2**20, torch.device("cpu")) == 64


def test_caller_saved_tensor_hooks_apply_when_one_pass_does_it_all():
    """Up to 48 points go in one pass with nothing to size, so our counting hook is not installed and the caller's
    own saved-tensor hooks (which ours would shadow: PyTorch's do not nest) see every tensor autograd saves."""
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    packed: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        packed.append(tensor.numel())
        return tensor

    x = torch.randn(48, 6)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        got = saliency(net, x, 1, abs=False)
    assert 48 * 16 in packed  # the ReLU's output, kept for its backward
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(net(leaf)[:, 1].sum(), leaf)
    torch.testing.assert_close(got, expected)
    packed.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        saliency(net, torch.randn(100, 6), 1)  # 32 points measured under our hook, then the other 68 in one pass
    assert 32 * 16 not in packed and 68 * 16 in packed


def test_lazy_modules_work_and_match_autograd():
    """A model with a lazy layer (parameters not yet materialized) is usable; the gradient is autograd's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    got = saliency(net, x, 1, abs=False)
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(net(leaf)[:, 1].sum(), leaf)
    assert torch.allclose(got, expected)
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
