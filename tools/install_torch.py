"""Install torch into the running interpreter's environment, choosing a build that suits the machine.

* torch already importable -> nothing is installed (a user's CUDA or ROCm build is kept).
* an explicit requirement on the command line (``make test TORCH="torch==2.5.1"``) -> that one.
* an NVIDIA driver present (``nvidia-smi`` on PATH) -> PyPI's default build, which ships CUDA.
* otherwise -> ``torch==2.13.0``; on this project's CI machines pip finds a local CPU wheel of it, so no
  multi-GB CUDA packages are downloaded onto a machine that cannot use them.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

CPU_DEFAULT = "torch==2.13.0"


def main(argv: list[str]) -> int:
    if argv:
        requirement = argv
    elif importlib.util.find_spec("torch") is not None:
        print("install_torch: torch already installed, keeping it")
        return 0
    elif shutil.which("nvidia-smi"):
        requirement = ["torch"]
    else:
        requirement = [CPU_DEFAULT]
    print("install_torch: pip install", " ".join(requirement))
    return subprocess.call([sys.executable, "-m", "pip", "install", "-q", *requirement])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
