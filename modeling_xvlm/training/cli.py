"""``xvlm-train``: the command-line dispatcher.

    xvlm-train                    # the CPU demo job (modeling_xvlm.training.main_job), same as `xvlm-train demo`
    xvlm-train demo [options]     # the demo job with options (`xvlm-train demo --help`)
    xvlm-train TASK [options]     # one training task (modeling_xvlm.training.train): pretrain, retrieval, grounding
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .main_job import main as demo_main
from .train import main as train_main


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] == "demo":
        return demo_main(argv[1:])
    if argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    return train_main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
