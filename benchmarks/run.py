"""Run the X-VLM benchmarks: `python -m benchmarks.run [--quick] [--only KEY ...] [--no-compile]`.

Every case runs in its own subprocess (fresh memory counters, no state shared between cases); torch.compile
variants run in further subprocesses bounded by `--compile-timeout`, and are recorded as "n/a" with the reason when
they fail or run out of time. Results go to `benchmarks/results.json` and the table in `docs/benchmarks.md` is
regenerated from them (`--quick` writes `benchmarks/results_quick.json` and leaves the docs alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.json"
RESULTS_QUICK = ROOT / "benchmarks" / "results_quick.json"
DOC = ROOT / "docs" / "benchmarks.md"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Worker side (inside the subprocess)
# ---------------------------------------------------------------------------------------------------------------


def every_case(quick: bool) -> list:
    from .answer_ranking import answer_ranking_cases
    from .attention_kernels import AttentionKernelsCase
    from .caption_generation import caption_generation_cases
    from .cases import all_cases
    from .converter_memory import converter_memory_cases
    from .data_pipeline import data_pipeline_cases
    from .int8_inference import int8_cases
    from .padding_free import padding_free_cases
    from .retrieval_eval import retrieval_cases
    from .retrieval_scale import retrieval_scale_cases

    return (all_cases(quick) + retrieval_cases(quick) + answer_ranking_cases(quick) + [AttentionKernelsCase(quick)]
            + int8_cases(quick) + retrieval_scale_cases(quick) + padding_free_cases(quick)
            + data_pipeline_cases(quick) + converter_memory_cases(quick) + caption_generation_cases(quick))


def _find_case(key: str, quick: bool):
    for case in every_case(quick):
        if case.key == key:
            return case
    raise KeyError(f"Unknown benchmark {key!r}")


def worker_eager(key: str, quick: bool, warmup: int, repeats: int) -> dict[str, Any]:
    """All non-compiled variants of one case, interleaved."""
    import torch

    from .harness import Variant, measure_interleaved

    case = _find_case(key, quick)
    reason = case.unavailable_reason()
    if reason:
        return {"case": case.describe(), "skipped": reason}
    if hasattr(case, "worker"):
        return case.worker(warmup, repeats, log)
    if hasattr(case, "measure"):
        from .retrieval_eval import worker_retrieval

        return worker_retrieval(case, warmup, repeats, log)
    start = time.perf_counter()
    case.build()
    build_s = time.perf_counter() - start
    variants = case.variants()
    calls = {v.name: case.callable_for(v) for v in variants}
    # first call of every variant: the outputs compared below (and the first warm-up round)
    outputs = {}
    for variant in variants:
        log(f"  first call {variant.name}")
        outputs[variant.name] = calls[variant.name]()
    agreement = {}
    by_name = {v.name: v for v in variants}
    for variant in variants:
        if variant.precision == "bf16" or variant.checkpointing:
            reference = Variant(variant.attn, "fp32")  # bf16 vs fp32, checkpointing vs none
        elif variant.attn != "eager":
            reference = Variant("eager", "fp32")  # sdpa vs eager
        else:
            continue
        if reference.name in by_name:
            agreement[variant.name] = {
                "reference": reference.name,
                **case.compare(outputs[reference.name], outputs[variant.name]),
            }
    if case.max_repeats:
        repeats = min(repeats, case.max_repeats)
    timings = measure_interleaved(calls, max(0, warmup - 1), repeats, log)
    results = {v.name: {"variant": v.to_dict(), **timings[v.name].summary(case.items)} for v in variants}
    extra = case.extra_results() if hasattr(case, "extra_results") else {}
    return {
        "case": case.describe(),
        "build_s": build_s,
        "results": results,
        "agreement": agreement,
        "torch_threads": torch.get_num_threads(),
        **extra,
    }


def worker_compile(key: str, quick: bool, precision: str, warmup: int, repeats: int) -> dict[str, Any]:
    """One torch.compile variant (sdpa) of one case: compile time, steady-state time, agreement with eager."""
    import torch

    from .harness import Variant, measure_interleaved

    case = _find_case(key, quick)
    reason = case.unavailable_reason()
    if reason:
        return {"skipped": reason}
    case.build()
    if case.max_repeats:
        repeats = min(repeats, case.max_repeats)
    variant = Variant("sdpa", precision, compile=True)
    plain = Variant("sdpa", precision)
    reference = case.callable_for(plain)()
    compiled_fn = torch.compile(case.forward)
    call = case.callable_for(variant, compiled=compiled_fn)
    start = time.perf_counter()
    output = call()
    compile_s = time.perf_counter() - start
    log(f"  compile + first call: {compile_s:.1f}s")
    # the plain variant is timed again here, interleaved with the compiled one, so that the speed-up compares
    # runs made under the same machine load
    timings = measure_interleaved(
        {variant.name: call, plain.name: case.callable_for(plain)}, max(0, warmup - 1), repeats, log
    )
    return {
        "variant": variant.to_dict(),
        "compile_s": compile_s,
        **timings[variant.name].summary(case.items),
        "plain_same_run": timings[plain.name].summary(case.items),
        "agreement": {"reference": plain.name, **case.compare(reference, output)},
    }


def worker_main(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.worker_mode == "eager":
            result = worker_eager(args.worker, args.quick, args.warmup, args.repeats)
        else:
            result = worker_compile(args.worker, args.quick, args.worker_mode, args.warmup, args.repeats)
    except Exception as error:  # recorded, not raised: one failing case must not stop the others
        result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    Path(args.out).write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------------------------


def run_worker(key: str, mode: str, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    command = [
        sys.executable, "-m", "benchmarks.run", "--worker", key, "--worker-mode", mode, "--out", out,
        "--warmup", str(args.warmup), "--repeats", str(args.repeats),
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.quick:
        command.append("--quick")
    start = time.perf_counter()
    try:
        completed = subprocess.run(command, cwd=ROOT, timeout=timeout)
        if completed.returncode != 0 and not os.path.getsize(out):
            return {"error": f"worker exited with status {completed.returncode}"}
        result = json.loads(Path(out).read_text())
    except subprocess.TimeoutExpired:
        result = {"error": f"timed out after {timeout:.0f}s (bound set by the benchmark runner)"}
    except json.JSONDecodeError as error:
        result = {"error": f"no result from worker: {error}"}
    finally:
        if os.path.exists(out):
            os.unlink(out)
    result["wall_s"] = time.perf_counter() - start
    return result


def combine_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from several runs: cases merged in order (compile variants kept from whichever has them),
    the machine and settings of the first run, every run's command listed."""
    combined: dict[str, Any] = {"cases": {}, "runs": []}
    for part in parts:
        for key in ("machine", "command", "settings", "total_wall_s"):
            if key in part and key not in combined:
                combined[key] = part[key]
        if part.get("compile_run"):
            combined["compile_run"] = part["compile_run"]
        runs = part.get("runs") or [{"command": part.get("command"), "date": part.get("machine", {}).get("date"),
                                     "cases": list(part.get("cases", {}))}]
        for run in runs:
            if run not in combined["runs"]:
                combined["runs"].append(run)
        for key, case in part.get("cases", {}).items():
            previous = combined["cases"].get(key, {})
            merged = dict(case)
            compiled = {name: value for name, value in case.get("compile", {}).items() if "median_s" in value}
            kept = {name: value for name, value in previous.get("compile", {}).items() if "median_s" in value}
            if kept or compiled:
                merged["compile"] = {**case.get("compile", {}), **kept, **compiled}
            combined["cases"][key] = merged
    return combined


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, few runs, no compile (smoke test)")
    parser.add_argument("--only", nargs="*", help="case keys to run (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--compile-only", action="store_true",
                        help="run only the torch.compile variants, keeping the other results (implies --merge)")
    parser.add_argument("--compile-timeout", type=float, default=900.0, help="seconds per compile variant")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2, quick 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, quick 3)")
    parser.add_argument("--output", type=Path, default=None, help="JSON output path")
    parser.add_argument("--doc", type=Path, default=None, help="markdown file whose table is regenerated")
    parser.add_argument("--merge", action="store_true", help="update the existing JSON instead of replacing it")
    parser.add_argument("--list", action="store_true", help="list the case keys and exit")
    parser.add_argument("--lean", action="store_true",
                        help="benchmark 6: one run per protocol, sdpa only, one encoding round (time-bounded runs)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in the workers (default: torch's, = the cores); results are stored under "
                             "'<case>@<n>t' so that they sit next to the default-thread results")
    parser.add_argument("--combine", nargs="+", type=Path, default=None,
                        help="merge result JSONs of separate runs (later files win per case) into --output and "
                             "regenerate the doc; runs nothing")
    # worker-only arguments
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-mode", default="eager", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.lean:
        os.environ["XVLM_BENCH_LEAN"] = "1"  # inherited by the workers
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5

    if args.worker:
        worker_main(args)
        return

    from .harness import machine_info
    from .report import write_report

    if args.combine:
        combined = combine_results([json.loads(path.read_text()) for path in args.combine])
        output = args.output or RESULTS
        output.write_text(json.dumps(combined, indent=1))
        write_report(combined, args.doc or DOC)
        log(f"wrote {output} and {args.doc or DOC}")
        return

    cases = every_case(args.quick)
    if args.list:
        for case in cases:
            print(f"{case.key:40s} {case.number}. {case.title}")
        return
    if args.only:
        unknown = set(args.only) - {c.key for c in cases}
        if unknown:
            parser.error(f"unknown case keys {sorted(unknown)}; see --list")
        cases = [c for c in cases if c.key in args.only]

    output = args.output or (RESULTS_QUICK if args.quick else RESULTS)
    doc = args.doc if args.doc is not None else (None if args.quick else DOC)
    data: dict[str, Any] = {"cases": {}}
    if args.compile_only:
        args.merge = True
    if args.merge and output.exists():
        data = json.loads(output.read_text())
    command = ("python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    settings = {
        "warmup": args.warmup,
        "repeats": args.repeats,
        "quick": args.quick,
        "compile": not args.no_compile and not args.quick,
        "compile_timeout_s": args.compile_timeout,
    }
    if args.compile_only:
        data["compile_run"] = {"command": command, "machine": machine_info(), "settings": settings}
    else:
        runs = data.setdefault("runs", []) if args.merge else []
        info = machine_info()
        runs.append({"command": command, "date": info["date"], "load_average_at_start": info["load_average_at_start"],
                     "cases": [c.key for c in cases], "cpu": info.get("cpu"), "cpu_flags": info.get("cpu_flags"),
                     "settings": settings})
        data["runs"] = runs
        if not (args.merge and "machine" in data):  # a merged run keeps the header of the first; it is in `runs`
            data.update(machine=info, command=command, settings=settings)
    total_start = time.perf_counter()
    for case in cases:
        log(f"== {case.number}. {case.key}: {case.title}")
        if args.compile_only:
            result = data["cases"].get(case.key + (f"@{args.threads}t" if args.threads else ""))
            if not result or "results" not in result:
                log("   no earlier results for this case: run it without --compile-only first")
                continue
        else:
            result = run_worker(case.key, "eager", args, timeout=3600)
        if "error" in result:
            log(f"   error: {result['error']}")
        compile_results: dict[str, Any] = {}
        wants_compile = not args.no_compile and not args.quick and "results" in result
        for variant in case.compile_variants() if wants_compile else []:
            log(f"   torch.compile {variant.name}")
            compiled = run_worker(case.key, variant.precision, args, timeout=args.compile_timeout)
            if "error" in compiled:
                log(f"   compile n/a: {compiled['error']}")
            compile_results[variant.name] = compiled
        if not wants_compile and "results" in result:
            reason = "not run (--quick)" if args.quick else "not run (--no-compile)"
            if args.merge and case.key in data["cases"] and data["cases"][case.key].get("compile"):
                compile_results = data["cases"][case.key]["compile"]
            else:
                compile_results = {v.name: {"skipped": reason} for v in case.compile_variants()}
        result["compile"] = compile_results
        if args.threads:
            result.setdefault("case", {})["threads"] = args.threads
        data["cases"][case.key + (f"@{args.threads}t" if args.threads else "")] = result
        output.write_text(json.dumps(data, indent=1))
    if not args.compile_only:
        runs[-1]["wall_s"] = time.perf_counter() - total_start
        if not (args.merge and "total_wall_s" in data):
            data["total_wall_s"] = runs[-1]["wall_s"]
    output.write_text(json.dumps(data, indent=1))
    log(f"wrote {output}")
    if doc is not None:
        write_report(data, doc)
        log(f"updated {doc}")
    else:
        from .report import render_tables

        print(render_tables(data))


if __name__ == "__main__":
    main()
