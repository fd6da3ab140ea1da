"""Representer points and feature similarity, checked against independent computations (scikit-learn, scipy,
a dense evaluation by hand)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import lightning as L
import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression

import lightning_interp.attribution.representer as representer_module
import lightning_interp.attribution.similarity as similarity_module
from lightning_interp.attribution import (
    fit_representer,
    nearest_examples,
    sparse_examples,
    suspect_labels,
)
from lightning_interp.data import DigitsDataModule
from lightning_interp.errors import LightningInterpError
from lightning_interp.models import DigitsCNN


def _random_problem(n: int = 400, d: int = 12, c: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(c, (n,), generator=g)
    feats = torch.relu(torch.randn(c, d, generator=g)[labels] + torch.randn(n, d, generator=g))
    head = torch.randn(c, d, generator=g)
    probs = torch.softmax(feats @ head.T + torch.randn(c, generator=g), 1)
    return feats, probs, labels, head


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits_noisy():
    """A DigitsCNN (no normalization) trained 15 epochs on digits with 5% flipped labels: fc2 inputs, softmax
    outputs, given labels, flipped indices, head."""
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64, flip_fraction=0.05, seed=0)
    model = DigitsCNN(norm="none")
    trainer = L.Trainer(max_epochs=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")  # fmt: skip
    trainer.fit(model, dm)
    model.eval()
    x, y = dm.train_dataset.tensors
    with torch.no_grad():
        feats = model.net[:-1](x)
        probs = torch.softmax(model.net.fc2(feats), 1)
    return feats, probs, y, dm.flipped_indices, model.net.fc2


def _decomposition_error(fit, test: torch.Tensor) -> float:
    logits = fit.logits(test)
    summed = torch.stack([fit.values(test, classes=c).sum(1) for c in range(fit.num_classes)], 1)
    return float((logits - summed).abs().max() / logits.abs().max())


# ---- 1. decomposition -------------------------------------------------------------------------------------------
def test_decomposition_exact_on_random_features():
    feats, probs, _, head = _random_problem()
    fit = fit_representer(feats, probs, lam=0.003, init_weight=head)
    assert fit.converged and fit.stationarity <= 1e-9
    test = torch.randn(30, feats.shape[1], generator=torch.Generator().manual_seed(5))
    assert _decomposition_error(fit, test) <= 1e-6
    # by hand, with the +1 bias term: z_t = sum_i alpha_i (f_i . f_t + 1)
    f64, t64 = feats.double(), test.double()
    by_hand = (t64 @ f64.T + 1) @ fit.alpha
    assert torch.allclose(by_hand, fit.logits(test), rtol=0, atol=1e-6 * float(by_hand.abs().max()))
    assert fit.decomposition_residual <= 1e-6


def test_decomposition_exact_on_digits_features(digits_noisy):
    feats, probs, _, _, fc2 = digits_noisy
    fit = fit_representer(feats, probs, init_weight=fc2.weight, init_bias=fc2.bias)
    assert fit.converged
    assert _decomposition_error(fit, feats[:50]) <= 1e-6
    # the residual is what the identity W - alpha^T F = grad J / (2 lam) predicts: tiny here
    assert fit.decomposition_residual <= 1e-6


def test_alpha_is_the_scaled_negative_loss_gradient():
    feats, probs, _, _ = _random_problem(n=150, d=6, c=3, seed=1)
    probs = probs.double() / probs.double().sum(1, keepdim=True)  # rows summing to 1 in float64
    lam = 0.01
    fit = fit_representer(feats, probs, lam=lam)
    f = torch.cat([feats.double(), torch.ones(150, 1, dtype=torch.float64)], 1)
    w = torch.cat([fit.weight, fit.bias[:, None]], 1).requires_grad_(True)
    z = f @ w.T
    loss = -(probs.double() * torch.log_softmax(z, 1)).sum()  # L = sum_i CE, dL/dz_i by autograd
    (dz,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(fit.alpha, -dz / (2 * lam * 150), rtol=0, atol=1e-12)


# ---- 2. same optimum as independent solvers ------------------------------------------------------------------------
def test_same_optimum_as_sklearn_on_hard_labels():
    feats, _, labels, _ = _random_problem(n=300, d=8, c=3, seed=2)
    lam, n = 0.003, 300
    fit = fit_representer(feats, torch.nn.functional.one_hot(labels, 3).double(), lam=lam)
    # sklearn minimises sum_i CE + ||W||^2 / (2C); ours is n times (1/n) sum_i CE + lam ||W||^2, so C = 1/(2 n lam)
    x = np.hstack([feats.double().numpy(), np.ones((n, 1))])
    reference = LogisticRegression(C=1 / (2 * n * lam), fit_intercept=False, tol=1e-12, max_iter=20000)
    reference.fit(x, labels.numpy())
    ours = torch.cat([fit.weight, fit.bias[:, None]], 1).numpy()
    np.testing.assert_allclose(ours, reference.coef_, rtol=0, atol=1e-5)


def test_same_optimum_as_scipy_on_soft_targets():
    feats, probs, _, _ = _random_problem(n=250, d=7, c=4, seed=3)
    lam, n, c = 0.003, 250, 4
    x = np.hstack([feats.double().numpy(), np.ones((n, 1))])
    p = probs.double().numpy()

    def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
        w = flat.reshape(c, -1)
        z = x @ w.T
        z = z - z.max(1, keepdims=True)
        log_q = z - np.log(np.exp(z).sum(1, keepdims=True))
        value = -(p * log_q).sum() / n + lam * (w**2).sum()
        grad = (np.exp(log_q) - p).T @ x / n + 2 * lam * w
        return value, grad.ravel()

    result = minimize(objective, np.zeros(c * x.shape[1]), jac=True, method="L-BFGS-B",
                      options={"gtol": 1e-13, "ftol": 1e-16, "maxiter": 50000, "maxcor": 30})  # fmt: skip
    fit = fit_representer(feats, probs, lam=lam)
    ours = torch.cat([fit.weight, fit.bias[:, None]], 1).numpy()
    np.testing.assert_allclose(ours, result.x.reshape(c, -1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tol", [1e-5, 1e-9, 1e-12])
def test_stationarity_reaches_tol_by_an_independent_gradient(tol):
    """The conjugate gradient runs in float32 and stops early (relative and tol-aware forcing): the returned head
    must still satisfy max |grad J| <= tol by a float64 autograd gradient, and report that value."""
    feats, probs, _, head = _random_problem(n=500, d=20, c=5, seed=8)
    lam = 0.003
    fit = fit_representer(feats, probs, lam=lam, tol=tol, init_weight=head)
    f = torch.cat([feats.double(), torch.ones(500, 1, dtype=torch.float64)], 1)
    p = probs.double() / probs.double().sum(1, keepdim=True)
    w = torch.cat([fit.weight, fit.bias[:, None]], 1).requires_grad_(True)
    objective = -(p * torch.log_softmax(f @ w.T, 1)).sum() / 500 + lam * (w * w).sum()
    (grad,) = torch.autograd.grad(objective, w)
    assert fit.converged and float(grad.abs().max()) <= tol
    assert abs(float(grad.abs().max()) - fit.stationarity) <= 1e-2 * tol


def test_start_does_not_change_the_optimum():
    feats, probs, _, head = _random_problem(seed=4)
    a = fit_representer(feats, probs)
    b = fit_representer(feats, probs, init_weight=head * 3)
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-7)
    torch.testing.assert_close(a.alpha, b.alpha, rtol=0, atol=1e-7)


def test_without_bias():
    feats, probs, _, _ = _random_problem(n=120, d=5, c=3, seed=6)
    fit = fit_representer(feats, probs, bias=False)
    assert fit.bias is None
    by_hand = feats[:7].double() @ feats.double().T @ fit.alpha
    torch.testing.assert_close(fit.logits(feats[:7]), by_hand, rtol=0, atol=1e-6 * float(by_hand.abs().max()))


# ---- 3. suspect labels --------------------------------------------------------------------------------------------
def test_suspect_labels_find_flips(digits_noisy):
    feats, probs, labels, flipped, _ = digits_noisy
    k = len(flipped)
    ranking = suspect_labels(feats, labels, k=k)
    precision = len(set(ranking.indices.tolist()) & set(flipped.tolist())) / k
    assert precision >= 0.75, precision
    assert ranking.rule == "label_refit" and ranking.indices.shape == (k,)
    assert bool((ranking.scores[:-1] >= ranking.scores[1:]).all())
    # the loss rule by hand: -log p_{i, y_i} of the model
    loss = suspect_labels(feats, labels, k=k, rule="loss", probs=probs)
    by_hand = (-probs.double().gather(1, labels[:, None])[:, 0].log()).argsort(descending=True)[:k]
    assert set(loss.indices.tolist()) == set(by_hand.tolist())


def test_trustai_rule_is_count_then_sum_of_positive_alphas():
    feats, probs, labels, _ = _random_problem(n=200, d=6, c=4, seed=7)
    fit = fit_representer(feats, probs)
    ranking = suspect_labels(feats, labels, rule="trustai", probs=probs, fit=fit)
    alpha = fit.alpha.numpy()
    keys = [((alpha[i] > 0).sum(), alpha[i][alpha[i] > 0].sum()) for i in range(200)]
    expected = sorted(range(200), key=lambda i: keys[i], reverse=True)
    assert [keys[i] for i in ranking.indices.tolist()] == [keys[i] for i in expected]


def test_suspect_labels_errors():
    feats, _, labels, _ = _random_problem(n=50, d=3, c=3)
    with pytest.raises(LightningInterpError, match="`probs`"):
        suspect_labels(feats, labels, rule="loss")
    with pytest.raises(LightningInterpError, match="`rule`"):
        suspect_labels(feats, labels, rule="cleanlab")  # type: ignore[arg-type]
    with pytest.raises(LightningInterpError, match="`labels`"):
        suspect_labels(feats, labels[:10])


def test_fit_errors():
    feats, probs, _, _ = _random_problem(n=20, d=3, c=3)
    with pytest.raises(LightningInterpError, match="`target_probs`"):
        fit_representer(feats, probs * 3)
    with pytest.raises(LightningInterpError, match="`lam`"):
        fit_representer(feats, probs, lam=0)
    bad = feats.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(LightningInterpError, match="`features`"):
        fit_representer(bad, probs)
    bad[0, 0], bad[1, 0] = float("inf"), float("-inf")  # the finiteness check sums first: inf - inf is NaN
    with pytest.raises(LightningInterpError, match="`features`"):
        fit_representer(bad, probs)
    bad_probs = probs.clone()
    bad_probs[3, 1] = float("nan")
    with pytest.raises(LightningInterpError, match="`target_probs`"):
        fit_representer(feats, bad_probs)
    # finite values whose sum overflows are not mistaken for NaN/Inf (uniform targets: the zero start is optimal)
    huge = torch.zeros(20, 3, dtype=torch.float64)
    huge[:2, 0] = 1e308
    assert fit_representer(huge, torch.full((20, 3), 1 / 3)).converged
    with pytest.raises(LightningInterpError, match="`init_weight`"):
        fit_representer(feats, probs, init_weight=torch.zeros(2, 2))


# ---- 4. chunked top-k and bounded memory -----------------------------------------------------------------------
def test_chunked_top_k_equals_dense(monkeypatch):
    feats, probs, _, _ = _random_problem(n=90, d=5, c=3, seed=8)
    fit = fit_representer(feats, probs)
    test = torch.randn(23, 5, generator=torch.Generator().manual_seed(9))
    # dense by hand, explaining the refit's predicted class
    f, t = feats.double(), test.double()
    classes = (t @ fit.weight.T + fit.bias).argmax(1)
    dense = (t @ f.T + 1) * fit.alpha[:, classes].T
    monkeypatch.setattr(representer_module, "_CHUNK_BYTES", 8 * 90 * 4)  # 4 test rows per chunk
    top = fit.top_k(test, k=6)
    expected_pro = dense.topk(6, dim=1)
    expected_con = dense.topk(6, dim=1, largest=False)
    torch.testing.assert_close(top.proponent_values, expected_pro.values, rtol=0, atol=1e-12)
    torch.testing.assert_close(top.opponent_values, expected_con.values, rtol=0, atol=1e-12)
    assert torch.equal(top.proponent_indices, expected_pro.indices)
    assert torch.equal(top.opponent_indices, expected_con.indices)
    torch.testing.assert_close(fit.values(test), dense, rtol=0, atol=1e-12)
    assert bool((top.proponent_values[:, 0] > 0).all()) and bool((top.opponent_values[:, 0] < 0).all())


def test_top_k_memory_is_bounded():
    """20,000 training x 600 test points with 4 MB chunks: the dense value matrix would take 96 MB; top_k must stay
    far below (chunks hold whole test rows, so at the default 64 MB the bound holds at 50k x 10k too)."""
    script = textwrap.dedent(
        """
        import resource, torch
        import lightning_interp.attribution.representer as module
        from lightning_interp.attribution.representer import RepresenterFit
        module._CHUNK_BYTES = 4 * 2**20
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(0)
        n, d, c, m = 20000, 64, 10, 600
        feats = torch.randn(n, d + 1, generator=g, dtype=torch.float64)
        alpha = torch.randn(n, c, generator=g, dtype=torch.float64)
        fit = RepresenterFit(alpha, torch.randn(c, d, dtype=torch.float64), torch.zeros(c, dtype=torch.float64),
                             feats, 0.003, 0.0, 0, True)
        test = torch.randn(m, d, generator=g)
        fit.top_k(test[:3], k=5)  # warm-up: the first float64 matmul maps library code into memory
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        top = fit.top_k(test, k=5)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024, tuple(top.proponent_indices.shape))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    extra_mb, shape = out.stdout.split(" ", 1)
    assert shape.strip() == "(600, 5)"
    assert float(extra_mb) < 40, extra_mb


# ---- similarity ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean"])
def test_nearest_examples_match_dense(metric, monkeypatch):
    g = torch.Generator().manual_seed(10)
    train, test = torch.randn(70, 6, generator=g), torch.randn(17, 6, generator=g)
    if metric == "cosine":
        dense = torch.nn.functional.cosine_similarity(test[:, None], train[None], dim=2)
    elif metric == "dot":
        dense = test @ train.T
    else:
        dense = -torch.cdist(test, train)
    monkeypatch.setattr(similarity_module, "_CHUNK_BYTES", 4 * 70 * 3)
    got = nearest_examples(test, train, k=4, metric=metric)
    expected = dense.topk(4, dim=1)
    assert torch.equal(got.indices, expected.indices)
    torch.testing.assert_close(got.scores, expected.values, rtol=0, atol=1e-5)


def test_sparse_examples_rank_least_supported_first():
    g = torch.Generator().manual_seed(11)
    train = torch.randn(60, 4, generator=g)
    test = torch.randn(25, 4, generator=g)
    dense = torch.nn.functional.cosine_similarity(test[:, None], train[None], dim=2)
    mean_top = dense.topk(3, dim=1).values.mean(1)
    got = sparse_examples(test, train, k=3, num=5)
    assert got.indices.tolist() == mean_top.argsort()[:5].tolist()
    torch.testing.assert_close(got.scores, mean_top.sort().values[:5], rtol=0, atol=1e-6)


def test_similarity_errors():
    with pytest.raises(LightningInterpError, match="`metric`"):
        nearest_examples(torch.zeros(2, 3), torch.zeros(4, 3), metric="l1")  # type: ignore[arg-type]
    with pytest.raises(LightningInterpError, match="same number of features"):
        nearest_examples(torch.zeros(2, 3), torch.zeros(4, 5))
