"""``xvlm-train``: the command-line dispatcher.

    xvlm-train                    # the CPU demo job (modeling_xvlm.training.main_job), same as `xvlm-train demo`
    xvlm-train demo [options]     # the demo job with options (`xvlm-train demo --help`)
    xvlm-train TASK [options]     # one training task (modeling_xvlm.training.train, `xvlm-train TASK --help`)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .main_job import build_parser as demo_parser
from .main_job import main as demo_main
from .train import TASK_HELP
from .train import main as train_main


def overview() -> str:
    """What `xvlm-train --help` prints: the three forms of the command and what every task trains."""
    width = max(len(task) for task in TASK_HELP)
    tasks = "\n".join(f"  {task:<{width}}  {what}" for task, what in TASK_HELP.items())
    return (
        "usage: xvlm-train [demo [options] | TASK [options]]\n\n"
        "Train X-VLM with accelerate (`accelerate launch -m modeling_xvlm.training.train TASK ...` for several "
        "processes).\n\n"
        f"  (no arguments), demo  {demo_parser().description}\n\n"
        f"TASK:\n{tasks}\n\n"
        "`xvlm-train demo --help` and `xvlm-train TASK --help` list the options (with their defaults)."
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] == "demo":
        return demo_main(argv[1:])
    if argv[0] in ("-h", "--help"):
        print(overview())
        return 0
    return train_main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
