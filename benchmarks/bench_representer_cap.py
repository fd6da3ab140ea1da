"""How RepresenterMonitor's answers change when its refit reads a fixed random sample of the training set instead of
all of it: the measurements behind the default ``max_train_examples``.

A 3-layer MLP is trained (Adam, 6 epochs) on a synthetic 10-class problem of ``--n`` examples (Gaussian clusters
in 32 dimensions, overlapping, 10% of the training labels replaced by a wrong class); its penultimate features are
then refit exactly as the monitor does (:func:`fit_representer` to the model's softmax outputs, and
:func:`suspect_labels` to the given labels), once on the whole training set and on samples of each size (three
sample seeds each, drawn as the monitor draws them: :func:`sample_batches`). Per sample size:

* **explained logits**: relative difference between the sample refit's logits and the full refit's on 256
  validation examples (what the decomposition ``z = sum_i alpha_i (f_i . f + 1)`` explains), and how often the two
  predict the same class;
* **proponents**: for each validation example and its predicted class, the top-4 (the monitor's ``k``) and top-20
  proponents *among the sampled examples*, ranked by the sample refit and by the full refit: the overlap (what the
  monitor shows is what the full refit would have shown from those candidates);
* **suspects**: the share of flipped labels among the 20 most suspect (the monitor's ``num_suspects``), and the
  recall of the flips present in the sample within the top ``(flips in the sample)``, for the sample refit against
  the full set's ranking;
* **seconds**: the refits on the sample (the feature pass scales with the sample size on top of this).

    python benchmarks/bench_representer_cap.py              # n = 32,768
    python benchmarks/bench_representer_cap.py --quick      # n = 8,192

It runs on the CPU whatever `--device` says, as the monitor's refit does (the features are moved there once).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import clock, machine, parse_with_device, table  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from lightning_interp.attribution import fit_representer, suspect_labels  # noqa: E402
from lightning_interp.examples import sample_batches  # noqa: E402

NUM_CLASSES, DIM, FLIP, K, SUSPECTS, LAM = 10, 32, 0.10, 4, 20, 0.003


def problem(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training inputs, given (noisy) labels, whether each label was flipped; validation inputs and labels."""
    g = torch.Generator().manual_seed(seed)
    means = 0.3 * torch.randn(NUM_CLASSES, DIM, generator=g)

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(NUM_CLASSES, (m,), generator=g)
        return means[y] + torch.randn(m, DIM, generator=g), y

    x, y = draw(n)
    flipped = torch.rand(n, generator=g) < FLIP
    noisy = torch.where(flipped, (y + torch.randint(1, NUM_CLASSES, (n,), generator=g)) % NUM_CLASSES, y)
    xv, yv = draw(256)
    return x, noisy, flipped, xv, yv


def trained_features(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(DIM, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
    head = nn.Linear(128, NUM_CLASSES)
    opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        for ids in torch.randperm(len(x), generator=g).split(128):
            loss = F.cross_entropy(head(body(x[ids])), y[ids])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return body(x), body(xv), head.weight.detach().clone(), head.bias.detach().clone()


def refits(f: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):  # type: ignore[no-untyped-def]
    probs = torch.softmax(F.linear(f, weight, bias).double(), dim=1)
    fit = fit_representer(f, probs, lam=LAM, init_weight=weight, init_bias=bias)
    ranking = suspect_labels(f, labels, lam=LAM)
    return fit, ranking


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    return statistics.mean(len(set(r.tolist()) & set(s.tolist())) / a.shape[1] for r, s in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parse_with_device(parser)
    n = args.n or (8192 if args.quick else 32768)
    x, labels, flipped, xv, _ = problem(n)
    f, fv, weight, bias = trained_features(x, labels, xv)
    start = clock()
    full, full_ranking = refits(f, labels, weight, bias)
    full_seconds = clock() - start
    full_logits = full.logits(fv)
    predicted = full_logits.argmax(1)
    full_values = full.values(fv, classes=predicted)  # (256, n)
    full_rank = torch.empty(n, dtype=torch.long)
    full_rank[full_ranking.indices] = torch.arange(n)
    dataset = TensorDataset(x, labels)
    rows = []
    sizes = [s for s in (1024, 2048, 4096, 8192, 16384) if s < n]
    for size in sizes:
        cells: dict[str, list[float]] = {}
        for seed in range(3):
            ids = torch.cat([i for _, i in sample_batches(dataset, size, seed=seed, batch_size=4096)])
            start = clock()
            fit, ranking = refits(f[ids], labels[ids], weight, bias)
            seconds = clock() - start
            logits = fit.logits(fv)
            values = fit.values(fv, classes=predicted)
            restricted = full_values[:, ids]
            flips_in = int(flipped[ids].sum())
            by_full = full_rank[ids].argsort()  # the sample ordered as the full ranking orders it
            measures = {
                "logits rel. diff": float((logits - full_logits).norm() / full_logits.norm()),
                "same class": float((logits.argmax(1) == predicted).double().mean()),
                "top-4 overlap": overlap(values.topk(K, 1).indices, restricted.topk(K, 1).indices),
                "top-20 overlap": overlap(values.topk(20, 1).indices, restricted.topk(20, 1).indices),
                "flips in top 20": float(flipped[ids][ranking.indices[:SUSPECTS]].double().mean()),
                "flips in top 20 (full ranking)": float(flipped[ids][by_full[:SUSPECTS]].double().mean()),
                "flip recall": float(flipped[ids][ranking.indices[:flips_in]].double().mean()),
                "flip recall (full ranking)": float(flipped[ids][by_full[:flips_in]].double().mean()),
                "seconds": seconds,
            }
            for key, value in measures.items():
                cells.setdefault(key, []).append(value)
        rows.append([f"{size:,}", *(f"{statistics.mean(v):.3f}" for v in cells.values())])
        header = list(cells)
    rows.append([f"all ({n:,})", "0", "1", "1", "1",
                 f"{float(flipped[full_ranking.indices[:SUSPECTS]].double().mean()):.3f}", "-",
                 f"{float(flipped[full_ranking.indices[: int(flipped.sum())]].double().mean()):.3f}", "-",
                 f"{full_seconds:.3f}"])  # fmt: skip
    print(f"\nMachine: {machine()}; n = {n:,}, {NUM_CLASSES} classes, {FLIP:.0%} flipped labels, features 128; "
          "means over 3 sample seeds\n")  # fmt: skip
    print(table(rows, ["sample", *header]))


if __name__ == "__main__":
    main()
