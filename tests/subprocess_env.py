"""The environment of the tests' training subprocesses: offline, a fixed thread count, this checkout importable."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def offline_env(threads: int = 1) -> dict[str, str]:
    """`os.environ` plus no Hub access, `threads` intra-op threads and `REPO` first on `PYTHONPATH`."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env
