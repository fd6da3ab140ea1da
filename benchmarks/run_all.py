"""Run every benchmark script in turn (``make bench``); ``--full`` drops their ``--quick`` flag;
other arguments (``--device cuda``, ``--precision bf16-mixed``) are handed to every script.

Benchmarks are scripts, not tests: they print tables (ratios measured side by side in one run) for the README.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPTS = ["bench_probes.py", "bench_normgrad.py", "bench_attribution.py", "bench_representer.py",
           "bench_representer_cap.py", "bench_probe_quality.py", "bench_transformer.py", "bench_suite.py"]
# soak.py (30 epochs) is run on its own: python benchmarks/soak.py [--baseline]


def main() -> int:
    full = "--full" in sys.argv[1:]
    passed = [a for a in sys.argv[1:] if a != "--full"]
    here = Path(__file__).resolve().parent
    failures = 0
    for script in SCRIPTS:
        args = [sys.executable, str(here / script), *passed] + ([] if full else ["--quick"])
        print(f"\n===== {' '.join(args[1:])}", flush=True)
        failures += subprocess.call(args) != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
