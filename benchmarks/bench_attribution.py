"""Gradient attributions vs Captum 0.9 (same process, same inputs, same settings), and the cost of a SaliencyMonitor dump.

    python benchmarks/bench_attribution.py            # digits CNN + ResNet-18 (width 64), batch 32
    python benchmarks/bench_attribution.py --quick    # ResNet-18 at width 16, batch 8, fewer steps
    python benchmarks/bench_attribution.py --pass-sizes --repeats 2
    python benchmarks/bench_attribution.py --faster-kernels --repeats 3
    python benchmarks/bench_attribution.py --isolated --processes 2 --calls 2

For each method: median wall time over ``--repeats`` runs (libraries interleaved) and the peak allocated
memory above the level before the call (glibc's count of bytes in use, sampled at 1 kHz in a first, untimed
call), for ours at
defaults, Captum at defaults (all points in one pass) and Captum tuned (``internal_batch_size`` /
``nt_samples_batch_size`` giving passes of 128 points), and the largest relative difference from Captum. Then
one SaliencyMonitor dump at its defaults on the ResNet-18 as a fraction of one epoch of the synthetic
ResNet-18 benchmark (2,048 examples, batch 128: 16 optimizer steps, step time measured on a plain training
step). With --pass-sizes: time per point against points per pass (how the default pass size was chosen); with
--faster-kernels: one pass with channels_last inputs and torch.compile against the NCHW kernels Captum uses,
and each one's error against float64; with --isolated: IG and SmoothGrad, ours and Captum's defaults each alone
in fresh processes (alternating), so neither library's memory traffic sets the other's page faults.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import common  # noqa: E402
from common import clock, device_arguments, machine, parse_with_device, table  # noqa: E402

from lightning_interp.attribution import (  # noqa: E402
    guided_backprop,
    input_x_gradient,
    integrated_gradients,
    saliency,
    smoothgrad,
)
from lightning_interp.attribution._gradients import (  # noqa: E402
    gradient_scope,
    input_gradients,
    points_per_pass,
    saved_bytes,
)
from lightning_interp.callbacks import SaliencyMonitor  # noqa: E402
from lightning_interp.data import SyntheticImageDataModule, load_digits_tensors  # noqa: E402
from lightning_interp.models import DigitsCNN, ResNet18  # noqa: E402

warnings.filterwarnings("ignore")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]  # fmt: skip


def _allocation_probe() -> Callable[[], float]:
    """MB the process has allocated and not freed (glibc's mallinfo2: heap in use + mmapped blocks), else
    resident memory. Unlike resident memory it falls when tensors are freed, with the allocator left at its
    defaults (an earlier version forced every large block through mmap, which made the timed calls up to 3x
    slower with page faults)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2

        def allocated() -> float:
            info = libc.mallinfo2()
            return (info.uordblks + info.hblkhd) / 2**20

        allocated()
        return allocated
    except (OSError, AttributeError):

        def resident() -> float:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

        return resident


_allocated_mb = _allocation_probe()


def peak_memory(fn: Callable[[], torch.Tensor]) -> float:
    """Peak allocated memory of a call of ``fn`` above the starting level (MB). The sampling thread slows calls
    that allocate often (ours by ~25% on ResNet-18 w16), so timings come from calls without it."""
    if common.DEVICE == "cuda":  # the allocator's own peak counter, exact
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return max(0.0, (torch.cuda.max_memory_allocated() - start) / 2**20)
    start, peak, done = _allocated_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _allocated_mb())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    fn()
    done.set()
    thread.join()
    return max(0.0, max(peak[0], _allocated_mb()) - start)


_SINGLE_PASS_ROUNDS = 9


def _minor_faults() -> int:
    """Pages the process has had to map on first touch so far: a tensor in freshly mmapped memory (glibc maps
    every block over its threshold, at most 32 MB, on its own) costs one fault per 4 kB page."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(fn: Callable[[], object]) -> tuple[float, int, object]:
    """One call of ``fn``: its wall time (s), the page faults it took (:func:`_minor_faults`) and its result."""
    f0, t0 = _minor_faults(), clock()
    result = fn()
    return clock() - t0, _minor_faults() - f0, result


def _count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else f"{n:.0f}"


def methods(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, steps: int, samples: int, sigma: float):
    from captum.attr import GuidedBackprop, InputXGradient, IntegratedGradients, NoiseTunnel, Saliency

    tuned = 128
    per_chunk = max(1, tuned // x.shape[0])

    def noise_pair():
        # the same noise for both: Captum draws it from the global RNG, we take it as an argument
        torch.manual_seed(0)
        return (torch.randn((x.shape[0] * samples, *x.shape[1:])) * sigma).reshape(
            x.shape[0], samples, *x.shape[1:]
        )

    def captum_smoothgrad(batch: int | None) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            torch.manual_seed(0)
            return NoiseTunnel(Saliency(model)).attribute(
                x,
                nt_type="smoothgrad",
                nt_samples=samples,
                stdevs=sigma,
                target=t,
                nt_samples_batch_size=batch,
            )

        return run

    noise = noise_pair()
    return {
        "saliency": (lambda: saliency(model, x, t), lambda: Saliency(model).attribute(x, t), None),
        "input_x_gradient": (lambda: input_x_gradient(model, x, t), lambda: InputXGradient(model).attribute(x, t), None),
        "guided_backprop": (lambda: guided_backprop(model, x, t), lambda: GuidedBackprop(model).attribute(x, t), None),
        f"integrated_gradients (n_steps={steps})": (
            lambda: integrated_gradients(model, x, t, n_steps=steps),
            lambda: IntegratedGradients(model).attribute(x, target=t, n_steps=steps),
            lambda: IntegratedGradients(model).attribute(x, target=t, n_steps=steps, internal_batch_size=tuned),
        ),
        f"smoothgrad (n_samples={samples})": (
            lambda: smoothgrad(model, x, t, sigma, n_samples=samples, noise=noise),
            captum_smoothgrad(None),
            captum_smoothgrad(per_chunk),
        ),
    }  # fmt: skip


def setups(width: int, batch: int) -> dict[str, Callable[[], tuple[torch.nn.Module, torch.Tensor]]]:
    """The two benchmark models and their inputs, built from seed 0: the digits CNN on 32 digits and ResNet-18
    (``width``) on ``batch`` random 3x32x32 images."""

    def digits() -> tuple[torch.nn.Module, torch.Tensor]:
        images, _ = load_digits_tensors()
        torch.manual_seed(0)
        return DigitsCNN().to(common.DEVICE), images[:32].to(common.DEVICE)

    def resnet() -> tuple[torch.nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        return ResNet18(width=width).to(common.DEVICE), images.to(common.DEVICE)

    return {"digits CNN": digits, f"ResNet-18 w{width}": resnet}


def compare_methods(
    name: str, model: torch.nn.Module, x: torch.Tensor, steps: int, samples: int, repeats: int
):
    model.eval()
    t = torch.arange(x.shape[0], device=x.device) % 10
    rows = []
    for method, (ours, theirs, tuned) in methods(model, x, t, steps, samples, 0.15).items():
        runs: dict[str, list[tuple[float, float]]] = {"ours": [], "captum": [], "tuned": []}
        faults: dict[str, list[int]] = {"ours": [], "captum": [], "tuned": []}
        results = {}
        memory = {}
        for key, fn in (("ours", ours), ("captum", theirs), ("tuned", tuned)):  # also the warm-up call
            if fn is not None:
                memory[key] = peak_memory(fn)
        # interleaved, so machine noise hits every side alike; single-pass calls (under a second) get at least 9
        rounds = repeats if tuned is not None else max(repeats, _SINGLE_PASS_ROUNDS)
        for _ in range(rounds):
            for key, fn in (("ours", ours), ("captum", theirs), ("tuned", tuned)):
                if fn is None:
                    continue
                seconds, faulted, out = _timed(fn)
                runs[key].append((seconds, memory[key]))
                faults[key].append(faulted)
                results[key] = out.detach()
        err = float((results["ours"] - results["captum"]).abs().max() / results["captum"].abs().max())
        med = {k: (statistics.median(s for s, _ in v), max(m for _, m in v)) for k, v in runs.items() if v}
        tuned_cells = [f"{med['tuned'][0]:.3f}", f"{med['tuned'][1]:.0f}"] if "tuned" in med else ["=", "="]
        rows.append(
            [name, method, f"{med['ours'][0]:.3f}", f"{med['ours'][1]:.0f}", f"{med['captum'][0]:.3f}",
             f"{med['captum'][1]:.0f}", *tuned_cells, f"{med['captum'][0] / med['ours'][0]:.2f}x",
             f"{(med['tuned'][0] if 'tuned' in med else med['captum'][0]) / med['ours'][0]:.2f}x", f"{err:.1e}",
             " / ".join(_count(statistics.median(faults[k])) for k in ("ours", "captum", "tuned") if faults[k])]
        )  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def pass_sizes(model: torch.nn.Module, shape: tuple[int, ...], points: int, sizes: list[int], repeats: int):
    """Time per point of the input-gradient pass over ``points`` random inputs in passes of each size (interleaved
    medians), with the size our default picks for this model marked."""
    model.eval().to(common.DEVICE)
    x = torch.randn(points, *shape, generator=torch.Generator().manual_seed(0)).to(common.DEVICE)
    t = torch.arange(points, device=x.device) % 10
    with gradient_scope(model):
        with saved_bytes(model) as count:
            model(x[:32].clone().requires_grad_(True))
    ours = points_per_pass(count[0] / 32)

    def run(size: int) -> None:
        with gradient_scope(model):
            for _ in input_gradients(model, points, lambda a, b: x[a:b], lambda a, b: t[a:b], size):
                pass

    times: dict[int, list[float]] = {size: [] for size in sorted({*sizes, ours})}
    faults: dict[int, list[int]] = {size: [] for size in times}
    run(ours)
    for _ in range(repeats):
        for size in times:
            seconds, faulted, _ = _timed(lambda: run(size))
            times[size].append(seconds)
            faults[size].append(faulted)
    best = min(statistics.median(v) for v in times.values())
    return [
        [
            f"{size}{' (ours)' if size == ours else ''}",
            f"{count[0] / 32 * size / 2**20:.0f}",
            f"{1e3 * statistics.median(v) / points:.2f}",
            f"{statistics.median(v) / best:.2f}",
            _count(statistics.median(faults[size])),
        ]
        for size, v in times.items()
    ]


def faster_kernels(width: int, points: int, repeats: int, compiled: bool) -> list[list[str]]:
    """One input-gradient pass of ResNet-18 over ``points`` inputs with the kernels Captum uses (NCHW), with
    channels_last inputs and (``compiled``) through ``torch.compile``: time, and the error of each against the
    same pass in float64, next to the difference from the NCHW result and the ReLUs whose sign differs there.
    A study of this CPU's kernels: it runs on the CPU whatever ``--device`` says.
    """
    torch.manual_seed(0)
    net = ResNet18(width=width).net
    net.train()
    with torch.no_grad():  # running statistics of a few batches, so eval mode is not the untrained identity
        for _ in range(3):
            net(torch.randn(64, 3, 32, 32))
    net.eval()
    x = torch.randn(points, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.arange(points) % 10

    def gradient(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.detach().requires_grad_(True)
        return torch.autograd.grad(model(inputs).gather(1, t[:, None]).sum(), inputs)[0]

    def relu_inputs(model: torch.nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
        seen: list[torch.Tensor] = []
        relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)]
        handles = [
            m.register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach() > 0)) for m in relus
        ]
        with torch.no_grad():
            model(inputs)
        for h in handles:
            h.remove()
        return seen

    net.requires_grad_(False)  # as our functions run a model: no layer keeps its input for a weight gradient
    reference = gradient(copy.deepcopy(net).double(), x.double())
    variants: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {
        "NCHW (as Captum)": (net, x),
        "channels_last inputs": (net, x.contiguous(memory_format=torch.channels_last)),
    }
    if compiled:
        variants["torch.compile (inductor)"] = (torch.compile(net), x)
    results = {
        name: gradient(model, inputs) for name, (model, inputs) in variants.items()
    }  # warm-up / compile
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (model, inputs) in variants.items():
            t0 = clock()
            gradient(model, inputs)
            times[name].append(clock() - t0)
    masks = {name: relu_inputs(model, inputs) for name, (model, inputs) in variants.items()}
    nchw = "NCHW (as Captum)"
    rows = []
    for name, grad in results.items():
        flips = sum(int((a != b).sum()) for a, b in zip(masks[name], masks[nchw]))
        rows.append([
            f"ResNet-18 w{width}", name, f"{statistics.median(times[name]):.3f}",
            f"{statistics.median(times[nchw]) / statistics.median(times[name]):.2f}x",
            f"{float((grad.double() - reference).abs().max() / reference.abs().max()):.1e}",
            f"{float((grad - results[nchw]).abs().max() / results[nchw].abs().max()):.1e}", str(flips),
        ])  # fmt: skip
    return rows


def _worker(spec: str, width: int, batch: int, steps: int, samples: int) -> None:
    """``--worker MODEL,METHOD,LIBRARY,CALLS``: time CALLS calls of one method of one library in this (fresh)
    process and print ``[[seconds, page faults], ...]`` as JSON."""
    model_name, method, library, calls = spec.split(",")
    model, x = setups(width, batch)[model_name]()
    model.eval()
    table = methods(model, x, torch.arange(x.shape[0], device=x.device) % 10, steps, samples, 0.15)
    fn = next(fns for name, fns in table.items() if name.startswith(method))[0 if library == "ours" else 1]
    print(json.dumps([_timed(fn)[:2] for _ in range(int(calls))]))


def isolated(
    width: int, batch: int, steps: int, samples: int, processes: int, calls: int, digits_calls: int
) -> list[list[str]]:
    """IG and SmoothGrad, ours and Captum's defaults, each alone in ``processes`` fresh processes per library
    (alternating ours, Captum, ours, ...), ``calls`` calls each (``digits_calls`` for the digits CNN, always at
    50 steps / 25 samples as in the main table): the first call of a process (cold: first use of the kernels and
    of the memory) and the median of the later ones."""
    rows = []
    for model_name in setups(width, batch):
        digits = model_name.startswith("digits")
        n_calls, n_steps, n_samples = (digits_calls, 50, 25) if digits else (calls, steps, samples)
        for method in ("integrated_gradients", "smoothgrad"):
            runs: dict[str, list[list[tuple[float, int]]]] = {"ours": [], "captum": []}
            for _ in range(processes):
                for library in runs:
                    command = [
                        sys.executable, os.path.abspath(__file__), "--worker",
                        f"{model_name},{method},{library},{n_calls}", "--width", str(width), "--batch", str(batch),
                        "--steps", str(n_steps), "--samples", str(n_samples), *device_arguments(),
                    ]  # fmt: skip
                    done = subprocess.run(command, capture_output=True, text=True, check=True)
                    runs[library].append(json.loads(done.stdout.strip().splitlines()[-1]))
            first = {k: statistics.median(r[0][0] for r in v) for k, v in runs.items()}
            later = {k: statistics.median(s for r in v for s, _ in r[1:]) for k, v in runs.items()}
            faults = {k: statistics.median(f for r in v for _, f in r[1:]) for k, v in runs.items()}
            rows.append([
                model_name, method, f"{first['ours']:.3f}", f"{first['captum']:.3f}",
                f"{first['captum'] / first['ours']:.2f}x", f"{later['ours']:.3f}", f"{later['captum']:.3f}",
                f"{later['captum'] / later['ours']:.2f}x", f"{_count(faults['ours'])} / {_count(faults['captum'])}",
            ])  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def monitor_cost(width: int, repeats: int) -> tuple[list[list[str]], str]:
    """One dump at the monitor's defaults vs one epoch (16 steps of batch 128) of ResNet-18 training."""
    torch.manual_seed(0)
    model = ResNet18(width=width).to(common.DEVICE)
    dm = SyntheticImageDataModule(num_examples=2048, batch_size=128)
    dm.setup("fit")
    defaults = SaliencyMonitor()
    from lightning_interp.examples import select_examples

    inputs, targets, _ = select_examples(dm.val_dataloader(), defaults.num_examples, defaults.seed)
    inputs, targets = inputs.to(common.DEVICE), targets.to(common.DEVICE)
    monitor = SaliencyMonitor(inputs=inputs, targets=targets)  # the examples the monitor would choose itself
    dumps = []
    for _ in range(repeats):
        model.eval()
        t0 = clock()
        result = monitor._compute(model, check=False)
        (batch, labels, predicted, probability), _ = result
        captions = [monitor._caption(labels, predicted, probability, i) for i in range(len(batch))]
        for method, maps in monitor.last_maps.items():
            monitor._draw(batch, maps, method, captions)
        dumps.append(clock() - t0)
    model.train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = (t.to(common.DEVICE) for t in next(iter(dm.train_dataloader())))
    steps = []
    for i in range(2):
        t0 = clock()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i > 0:  # the first step warms up
            steps.append(clock() - t0)
    dump, step = statistics.median(dumps), statistics.median(steps)
    epoch = 16 * step
    rows = [
        [f"ResNet-18 w{width}", f"{dump:.2f}", f"{step:.2f}", f"{epoch:.1f}", f"{100 * dump / epoch:.1f}%"]
    ]
    return rows, f"{monitor!r}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="ResNet-18 width 16, batch 8, fewer steps")
    parser.add_argument(
        "--width", type=int, default=None, help="ResNet-18 width (default 64; 16 with --quick)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="examples per call (default 32; 8 with --quick)"
    )
    parser.add_argument("--steps", type=int, default=None, help="IG n_steps (default 50; 10 with --quick)")
    parser.add_argument(
        "--samples", type=int, default=None, help="SmoothGrad samples (default 25; 5 with --quick)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="interleaved repeats (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--digits-repeats",
        type=int,
        default=15,
        help="interleaved repeats for the digits CNN (calls of ~0.1 s)",
    )
    parser.add_argument("--monitor-only", action="store_true", help="only the monitor-cost measurement")
    parser.add_argument("--skip-monitor", action="store_true", help="leave out the monitor-cost measurement")
    parser.add_argument(
        "--pass-sizes",
        action="store_true",
        help="only: time per point against the points per pass, per model",
    )
    parser.add_argument(
        "--faster-kernels",
        action="store_true",
        help="only: time and float64 error of one input-gradient pass with channels_last and torch.compile",
    )
    parser.add_argument(
        "--isolated",
        action="store_true",
        help="only: IG and SmoothGrad, ours and Captum's defaults each alone in fresh processes",
    )
    parser.add_argument("--processes", type=int, default=2, help="fresh processes per library (--isolated)")
    parser.add_argument("--calls", type=int, default=2, help="calls per ResNet process (--isolated)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parse_with_device(parser)
    q = args.quick
    width = args.width or (16 if q else 64)
    batch = args.batch or (8 if q else 32)
    steps = args.steps or (10 if q else 50)
    samples = args.samples or (5 if q else 25)
    repeats = args.repeats or (1 if q else 3)

    if args.worker:
        _worker(args.worker, width, batch, steps, samples)
        return
    if args.isolated:
        if min(args.calls, args.digits_repeats) < 2:
            parser.error("--isolated needs --calls and --digits-repeats >= 2 (the first call of a process is cold)")
        rows = isolated(width, batch, steps, samples, args.processes, args.calls, args.digits_repeats)
        print(
            f"\nMachine: {machine()}; ResNet-18 w{width} batch {batch} (IG {steps} steps, SmoothGrad {samples} "
            f"samples), digits CNN batch 32 (50 steps, 25 samples); {args.processes} fresh processes per library, "
            f"{args.calls} calls each ({args.digits_repeats} on digits)\n"
        )
        header = ["model", "method", "ours first s", "Captum first s", "first", "ours later s", "Captum later s"]
        print(table(rows, [*header, "later", "page faults later ours / Captum"]))
        return
    if args.pass_sizes:
        print(
            f"Machine: {machine()}; input-gradient passes over 512 random points (digits 2,048), median of {repeats}"
        )
        for name, model, shape, sizes in (
            ("digits CNN", DigitsCNN(), (1, 8, 8), [64, 128, 256, 512, 1024, 2048]),
            ("ResNet-18 w16", ResNet18(width=16), (3, 32, 32), [16, 32, 64, 128, 256, 512]),
            ("ResNet-18 w64", ResNet18(width=64), (3, 32, 32), [8, 16, 32, 64, 128, 256, 512]),
        ):
            rows = pass_sizes(model, shape, 2048 if name.startswith("digits") else 512, sizes, repeats)
            print(f"\n{name}:\n")
            print(table(rows, ["points per pass", "MB kept per pass", "ms per point", "vs fastest", "page faults"]))
        return
    if args.faster_kernels:
        points = (args.batch or 32) * (args.steps or 5)
        rows = faster_kernels(width, points, repeats, compiled=True)
        print(f"Machine: {machine()}; one input-gradient pass over {points} points, median of {repeats}\n")
        header = ["model", "kernels", "s", "speed-up", "error vs float64", "diff from NCHW", "ReLUs flipped"]
        print(table(rows, header))
        return
    if args.monitor_only:
        cost, config = monitor_cost(width, repeats)
        print(
            f"Machine: {machine()}\nSaliencyMonitor dump at defaults ({config}) vs one synthetic ResNet-18 epoch:\n"
        )
        print(
            table(cost, ["model", "dump s", "train step s (batch 128)", "epoch s (16 steps)", "dump / epoch"])
        )
        return
    build = setups(width, batch)
    rows = compare_methods(
        "digits CNN", *build["digits CNN"](), args.steps or 50, args.samples or 25, args.digits_repeats
    )
    rows += compare_methods(f"ResNet-18 w{width}", *build[f"ResNet-18 w{width}"](), steps, samples, repeats)
    print(
        f"\nMachine: {machine()}; digits batch 32 (IG {args.steps or 50} steps, SmoothGrad "
        f"{args.samples or 25} samples; median of {args.digits_repeats}), ResNet-18 batch {batch} (IG {steps} "
        f"steps, SmoothGrad {samples} samples; median of {repeats}, single-pass methods of {max(repeats, _SINGLE_PASS_ROUNDS)})\n"
    )
    print(
        table(
            rows,
            [
                "model",
                "method",
                "ours s",
                "ours MB",
                "Captum s",
                "Captum MB",
                "tuned s",
                "tuned MB",
                "vs Captum",
                "vs tuned",
                "max rel diff",
                "page faults ours / Captum / tuned",
            ],
        )  # fmt: skip
    )
    if not args.skip_monitor:
        cost, config = monitor_cost(width, repeats)
        print(f"\nSaliencyMonitor dump at defaults ({config}) vs one synthetic ResNet-18 epoch:\n")
        print(
            table(cost, ["model", "dump s", "train step s (batch 128)", "epoch s (16 steps)", "dump / epoch"])
        )


if __name__ == "__main__":
    main()
