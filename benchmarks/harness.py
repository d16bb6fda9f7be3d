"""Timing and memory helpers shared by the benchmark cases.

- Time: `time.perf_counter` around one call; the variants of a case are *interleaved* (round r runs every variant
  once, in an order shuffled from round to round) so that load from other processes on the machine, and the state
  one call leaves to the next, hit all variants alike; the reported value is the median
  of the timed rounds after the warm-up rounds, with min/max kept to show the spread. The process CPU time of each
  call (`time.process_time`, all threads) is kept too: on a shared machine it is far less disturbed by other
  processes than the wall time.
- Memory: freed heap memory is returned to the OS (`malloc_trim`), then the Linux peak resident set size
  (`VmHWM`) is reset before each timed call by writing `5` to `/proc/self/clear_refs`; the reported peak is
  `VmHWM` after the call minus `VmRSS` before it (the extra memory the call needed on top of the model and
  inputs), maximised over the timed rounds. Where the kernel does not allow the
  reset, the value is `None`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Variant:
    """One way of running a case: attention kernel, precision, torch.compile, activation checkpointing."""

    attn: str = "sdpa"  # "eager" | "sdpa"
    precision: str = "fp32"  # "fp32" | "bf16" (torch.autocast on the CPU)
    compile: bool = False
    checkpointing: bool = False

    @property
    def name(self) -> str:
        parts = [self.attn, self.precision]
        if self.compile:
            parts.append("compile")
        if self.checkpointing:
            parts.append("ckpt")
        return "/".join(parts)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        if self.precision != "fp32":
            raise ValueError(f"Unknown precision {self.precision!r}")
        return contextlib.nullcontext()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "name": self.name}


# -- memory --------------------------------------------------------------------------------------------------------


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def release_free_memory() -> None:
    """Return the allocator's cached free memory to the OS (glibc `malloc_trim`), so that the resident size before a
    call is not padded with pages that the call would reuse without raising the peak."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_mib() -> float | None:
    value = _status_kib("VmRSS")
    return None if value is None else value / 1024


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process; False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_mib() -> float | None:
    value = _status_kib("VmHWM")
    return None if value is None else value / 1024


# -- timing --------------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    times_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    peak_extra_mib: float | None = None

    def summary(self, items: int | None = None) -> dict[str, Any]:
        times = sorted(self.times_s)
        median = statistics.median(times)
        out: dict[str, Any] = {
            "median_s": median,
            "min_s": times[0],
            "max_s": times[-1],
            "spread": (times[-1] - times[0]) / median if median > 0 else 0.0,
            "runs": len(times),
            "times_s": self.times_s,
            "cpu_median_s": statistics.median(self.cpu_s) if self.cpu_s else None,
            "cpu_s": self.cpu_s,
            "peak_extra_mib": self.peak_extra_mib,
        }
        if items:
            out["items_per_s"] = items / median
        return out


def measure_interleaved(
    calls: dict[str, Callable[[], Any]],
    warmup: int,
    repeats: int,
    log: Callable[[str], None] | None = None,
) -> dict[str, Timing]:
    """Run every call `warmup + repeats` times, round-robin; time and memory from the last `repeats` rounds.

    The order of the calls within a round is shuffled (seeded) from round to round: a call's time can depend on
    the call before it (allocator and cache state), and identical work measured 2-5% apart in a fixed order.
    """
    timings = {name: Timing() for name in calls}
    can_reset = reset_peak()
    order = list(calls)
    shuffler = random.Random(0)
    for round_index in range(warmup + repeats):
        timed = round_index >= warmup
        if round_index:
            shuffler.shuffle(order)
        for name in order:
            call = calls[name]
            gc.collect()
            release_free_memory()
            before = rss_mib()
            if can_reset:
                reset_peak()
            cpu_start = time.process_time()
            start = time.perf_counter()
            call()
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
            if not timed:
                if log:
                    log(f"    warm-up {name}: {elapsed:.3f}s")
                continue
            timings[name].times_s.append(elapsed)
            timings[name].cpu_s.append(cpu)
            peak = peak_mib() if can_reset else None
            if peak is not None and before is not None:
                extra = max(0.0, peak - before)
                current = timings[name].peak_extra_mib
                timings[name].peak_extra_mib = extra if current is None else max(current, extra)
            if log:
                log(f"    run {round_index - warmup + 1}/{repeats} {name}: {elapsed:.3f}s")
    return timings


# -- machine description ------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx512_vnni")))
    except OSError:
        pass
    return []


def _git_commit() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    import transformers

    mem_total = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal"):
                    mem_total = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    load = None
    with contextlib.suppress(OSError):
        load = [round(v, 2) for v in os.getloadavg()]
    return {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": mem_total,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": _git_commit(),
        "load_average_at_start": load,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def cosine_min(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest row-wise cosine similarity between two `(n, d)` tensors (computed in fp64)."""
    a = a.detach().double().flatten(1)
    b = b.detach().double().flatten(1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())
