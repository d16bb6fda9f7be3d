"""Benchmarks 1-5 on two checkouts of the package, alternating: `python -m benchmarks.compare_revisions BEFORE AFTER`.

BEFORE and AFTER are folders holding a `modeling_xvlm/` package (e.g. a `git worktree` of an older commit and this
checkout). Every measurement runs in its own subprocess with that folder first on `sys.path`, on the workloads of
`benchmarks/cases.py` (this checkout's, X-VLM-base shapes, fp32, the default attention kernel, one thread per
core as configured). The order of the two revisions alternates round by round, so drift of the machine hits both;
the report gives the median of each case per revision and the ratio after / before (CPU seconds per call, lower
is better). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# case key -> the expression that builds it from benchmarks.cases
CASES = {
    "vision_224_b8": "VisionCase(224, 8)",
    "text_b32_l30": "TextCase(32, 30)",
    "fusion_32p": "FusionCase(pairs=32)",
    "fusion_32p_8img_shared": "FusionCase(pairs=32, images_shared=8)",
    "train_retrieval_224_b4": "TrainRetrievalCase(batch=4, image_size=224)",
    "grounding_384_b8": "GroundingCase(batch=8, image_size=384)",
}

_WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
sys.path.insert(1, sys.argv[2])
import torch
import modeling_xvlm
assert modeling_xvlm.__file__.startswith(sys.argv[1]), modeling_xvlm.__file__
from benchmarks import cases
case = eval("cases." + sys.argv[3])
case.build()
call = case.callable_for(cases.Variant("sdpa", "fp32"))
call()  # warm-up
times = []
for _ in range(int(sys.argv[4])):
    start = time.process_time()
    call()
    times.append(time.process_time() - start)
print(json.dumps({"cpu_s": sorted(times)[len(times) // 2]}))
"""


def measure(revision: Path, case: str, repeats: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _WORKER, str(revision), str(HERE.parent), CASES[case], str(repeats)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["cpu_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    parser.add_argument("--only", nargs="*", default=list(CASES))
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {c: {"before": [], "after": []} for c in args.only}
    for round_index in range(args.rounds):
        order = ("before", "after") if round_index % 2 == 0 else ("after", "before")
        for case in args.only:
            for name in order:
                revision = args.before if name == "before" else args.after
                results[case][name].append(measure(revision.resolve(), case, args.repeats))
                print(f"round {round_index + 1} {case} {name}: {results[case][name][-1]:.3f} s", file=sys.stderr)
    print("| case | before (CPU s / call) | after | after / before |")
    print("|---|---|---|---|")
    for case, runs in results.items():
        before, after = statistics.median(runs["before"]), statistics.median(runs["after"])
        print(f"| {case} | {before:.3f} | {after:.3f} | {after / before:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
