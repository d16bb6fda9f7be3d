"""Benchmark 12: peak memory and speed of the official-format converter (`convert_official`, behind `xvlm-data
convert-official`) against corpus size.

Corpus: official pre-training JSON lines, 3 image-text lines (`{"caption", "image_rpath"}`) to 1 region line
(`{"caption", "elems": [{"caption", "bb", "attributes"}], "image_rpath"}`), of N and 10 N lines in total. The lines
cycle through `IMAGES` photo-like JPEG files (benchmark 11's generator), more than the converter's 64-image cache, so
that every line reads and fully decodes (verifies) its image as in a real corpus. Shards of 500 MB
(`--shard-size-mb`'s default; `max_shard_bytes`), no progress bar.

Each conversion runs in a fresh subprocess (`python -m benchmarks.converter_memory --child ...`) that reads its
resident size after the imports, resets the kernel's peak counter, converts, and reads the peak (`VmHWM`). The
memory stays flat when the 10 N conversion peaks close to the N one: the converter streams its lines and holds one
row group (100 rows) per split, whatever the corpus size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .cases import SEED, Case

IMAGES = 100
SHARD_MB = 500
ROOT = Path(__file__).resolve().parent.parent


def write_images(folder: Path, count: int, width: int, height: int) -> list[str]:
    """`count` photo-like JPEG files in `folder`; their paths relative to it."""
    from .data_pipeline import photo_like_jpeg

    rng = np.random.default_rng(SEED)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        name = f"img_{index:05d}.jpg"
        (folder / name).write_bytes(photo_like_jpeg(width, height, rng))
        names.append(name)
    return names


def _region_line(name: str, width: int, height: int, rng: np.random.Generator) -> dict[str, Any]:
    elems = []
    for _ in range(int(rng.integers(3, 9))):
        w, h = int(rng.integers(4, width // 2)), int(rng.integers(4, height // 2))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        elems.append({"caption": "a small red circle", "bb": [x, y, w, h], "attributes": ["small"]})
    return {"caption": "a large blue square above a small red circle", "elems": elems, "image_rpath": name}


def write_official_lines(folder: Path, lines: int, names: list[str], width: int, height: int) -> list[Path]:
    """`lines` official JSON lines (3 image-text to 1 region line) in two files; their paths."""
    rng = np.random.default_rng(SEED)
    text, regions = folder / f"image_text_{lines}.json", folder / f"regions_{lines}.json"
    with open(text, "w") as text_file, open(regions, "w") as region_file:
        for index in range(lines):
            name = names[index % len(names)]
            if index % 4 == 3:
                region_file.write(json.dumps(_region_line(name, width, height, rng)) + "\n")
            else:
                line = {"caption": f"there are {index % 4 + 1} shapes in the image", "image_rpath": name}
                text_file.write(json.dumps(line) + "\n")
    return [text, regions]


def convert_in_subprocess(text: Path, regions: Path, images: Path, out: Path, shard_bytes: int) -> dict[str, Any]:
    """One conversion in a fresh process: its seconds, rows, shards, output size and memory."""
    report = out.with_suffix(".json")
    command = [sys.executable, "-m", "benchmarks.converter_memory", "--child", str(report), "--text", str(text),
               "--regions", str(regions), "--images", str(images), "--out", str(out), "--shard-bytes", str(shard_bytes)]
    subprocess.run(command, cwd=ROOT, check=True)
    result = json.loads(report.read_text())
    shards = sorted((out / "pretrain").glob("*.parquet"))
    return {**result, "shards": len(shards), "output_mib": sum(p.stat().st_size for p in shards) / 2**20}


def child(args: argparse.Namespace) -> None:
    """Convert in this process; write seconds, rows and `VmRSS` / `VmHWM` (MiB) to `args.child`."""
    from modeling_xvlm.data import convert_official

    from .harness import peak_mib, release_free_memory, reset_peak, rss_mib

    release_free_memory()
    baseline, import_peak = rss_mib(), peak_mib()
    can_reset = reset_peak()
    start = time.perf_counter()
    summary = convert_official(args.out, args.images, pretrain_text=[args.text], pretrain_regions=[args.regions],
                               max_shard_bytes=args.shard_bytes, progress=False)
    seconds = time.perf_counter() - start
    peak = peak_mib()
    Path(args.child).write_text(json.dumps({
        "rows_written": summary.num_written, "rows_skipped": summary.num_skipped, "seconds": seconds,
        "baseline_rss_mib": baseline, "import_peak_mib": import_peak, "peak_rss_mib": peak,
        "peak_reset": can_reset, "peak_above_baseline_mib": None if peak is None else peak - baseline,
    }))


class ConverterMemoryCase(Case):
    number = "12"
    key = "converter_memory"
    title = "official-format converter: peak memory and lines per second against corpus size (N and 10 N lines)"
    unit = "lines"

    def __init__(self, quick: bool = False):
        super().__init__(quick)
        self.lines = (500, 5000) if quick else (10_000, 100_000)
        self.image_size = (48, 36) if quick else (160, 120)
        self.shard_bytes = (2**20 if quick else SHARD_MB * 2**20)

    def worker(self, warmup: int, repeats: int, log) -> dict[str, Any]:
        root = Path(tempfile.mkdtemp(prefix="xvlm-bench12-"))
        try:
            names = write_images(root / "images", IMAGES, *self.image_size)
            rows = []
            for lines in self.lines:
                text, regions = write_official_lines(root, lines, names, *self.image_size)
                rows.append({"lines": lines, **convert_in_subprocess(text, regions, root / "images",
                                                                      root / f"out_{lines}", self.shard_bytes)})
                rows[-1]["lines_per_s"] = lines / rows[-1]["seconds"]
                log(f"    {rows[-1]}")
                shutil.rmtree(root / f"out_{lines}", ignore_errors=True)
            image_kib = sum((root / "images" / n).stat().st_size for n in names) / len(names) / 1024
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return {"case": self.describe(), "results": {}, "rows": rows, "images": IMAGES,
                "image_px": list(self.image_size), "image_kib_mean": image_kib, "shard_bytes": self.shard_bytes,
                "peak_ratio": rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]}

    def compile_variants(self) -> list:
        return []


def converter_memory_cases(quick: bool = False) -> list[Case]:
    return [ConverterMemoryCase(quick=quick)]


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark 12: one conversion in this process")
    parser.add_argument("--child", required=True, help="where to write the JSON report")
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--regions", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shard-bytes", type=int, required=True)
    child(parser.parse_args())


if __name__ == "__main__":
    main()
