"""Atomic, exactly resumable training checkpoints.

Layout (``root`` is ``<output_dir>/checkpoints``)::

    root/latest                      text file naming the newest complete checkpoint, replaced atomically
    root/step-00000120/
        model.safetensors            model weights (safetensors; tied weights stored once)
        optimizer.pt                 optimizer state dict
        scheduler.pt                 LR scheduler state dict
        scaler.pt                    fp16 GradScaler state (only with fp16 mixed precision)
        rng_state_<rank>.pt          python / numpy / torch (and CUDA) RNG states of each process
        trainer_state.json           step counters (the data position), arguments, metrics
        manifest.json                size and sha256 of every other file of the folder; written last

Atomicity: a checkpoint is written into ``root/.tmp-step-...``, every file is fsynced, the folder is renamed to
``step-...`` and only then ``latest`` is replaced (write ``latest.tmp`` + ``os.replace``). A process killed at any
moment (SIGKILL) leaves ``latest`` pointing at the previous complete checkpoint; stale ``.tmp-*`` folders are
removed by the next save. Everything is read back with ``torch.load(weights_only=True)`` (the numpy RNG state is
stored as a tensor for that reason).

With FSDP or DeepSpeed the model/optimizer/scheduler go through ``accelerator.save_state`` / ``load_state`` (they
hold sharded states) inside the same temporary-folder-and-rename scheme.

Verification: `load_checkpoint` first checks the folder against its manifest (every listed file present, with its
size and sha256) and raises `CheckpointError` naming the files that differ, so a corrupted, truncated or edited
file is never loaded. `newest_valid_checkpoint` walks the checkpoints from the newest down and returns the first
that verifies, reporting each one it skips (what ``xvlm-train --resume`` uses).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import DistributedType
from huggingface_hub.utils.sha import sha_fileobj
from safetensors.torch import load_model, save_model

__all__ = [
    "CHECKPOINT_PREFIX",
    "LATEST_FILE",
    "MANIFEST_FILE",
    "CheckpointError",
    "newest_valid_checkpoint",
    "verify_checkpoint",
    "write_manifest",
    "capture_rng_state",
    "restore_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "atomic_write_text",
]

CHECKPOINT_PREFIX = "step-"
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from: incomplete, or its files differ from its manifest."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - not supported on every platform
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    for folder in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
        _fsync_dir(folder)
    _fsync_dir(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ----------------------------------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA) RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------------


def _uses_accelerate_state(accelerator: Any) -> bool:
    return accelerator is not None and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _barrier(accelerator: Any) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return sha_fileobj(handle).hex()


def write_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Write ``folder/manifest.json``: ``{"files": {relative path: {"size", "sha256"}}}`` of every file under
    ``folder`` (the manifest itself excluded); returns it."""
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE
    }
    manifest = {"format": 1, "files": files}
    with open(folder / MANIFEST_FILE, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)
    return manifest


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check a checkpoint folder against its manifest; `CheckpointError` naming every missing, resized or changed
    file (or the missing / unreadable manifest)."""
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST_FILE}: it is incomplete (or was written before manifests "
                              "existed) and cannot be verified")
    try:
        files = json.loads(manifest_file.read_text(encoding="utf-8"))["files"]
        expected = {str(k): (int(v["size"]), str(v["sha256"])) for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{manifest_file} is not a valid checkpoint manifest ({error})") from None
    problems = []
    for name, (size, digest) in sorted(expected.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{name} has {file.stat().st_size} bytes, the manifest says {size}")
        elif _sha256(file) != digest:
            problems.append(f"{name} has changed (sha256 differs from the manifest)")
    if problems:
        raise CheckpointError(f"{path} does not match its manifest: " + "; ".join(problems))


def newest_valid_checkpoint(root: str | os.PathLike, say: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint under ``root`` that verifies (`verify_checkpoint`), starting from the one ``latest``
    names; each newer one that fails is reported through ``say``. ``None`` when ``root`` holds no checkpoint;
    `CheckpointError` when there are checkpoints but none verifies."""
    root = Path(root)
    candidates = list_checkpoints(root)[::-1]
    pointer = root / LATEST_FILE
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8", errors="replace").strip()
        candidates = [named] + [c for c in candidates if c != named and c.name < named.name]
    if not candidates:
        return None
    failures = []
    for candidate in candidates:
        try:
            if not (candidate / STATE_FILE).is_file():
                raise CheckpointError(f"{candidate} is not a complete checkpoint")
            verify_checkpoint(candidate)
        except CheckpointError as error:
            failures.append(str(error))
            say(f"skipping checkpoint {candidate.name}: {error}")
            continue
        if failures:
            say(f"falling back to {candidate.name}, the newest checkpoint that verifies")
        return candidate
    raise CheckpointError(f"no checkpoint under {root} verifies: " + " | ".join(failures))


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``root/latest`` names, or ``None`` when there is none yet.

    Raises ``FileNotFoundError`` when ``latest`` names a folder that is missing or incomplete (it never does unless
    files were deleted by hand).
    """
    root = Path(root)
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    path = root / name
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {name!r}, which is not a complete checkpoint")
    return path


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    trainer_state: dict[str, Any],
    accelerator: Any = None,
    total_limit: int | None = None,
    stage_hook: Any = None,
) -> Path:
    """Write the checkpoint of ``step`` atomically and point ``latest`` at it (call on every process).

    Args:
        root: the checkpoints folder.
        step: the optimizer step just completed (the folder is ``step-{step:08d}``).
        model: the (possibly wrapped) model.
        optimizer, scheduler: their ``state_dict`` is saved.
        trainer_state: JSON-serialisable counters and metadata (the data position lives here).
        accelerator: the ``accelerate.Accelerator`` (process ranks, unwrapping, FSDP/DeepSpeed state).
        total_limit: keep at most this many checkpoints (oldest removed after ``latest`` moves).
        stage_hook: called with the stage ``"mid_save"`` once the model and optimizer files are written
            (the training loop's `TrainingCallback.on_checkpoint_stage`).

    Returns:
        The checkpoint folder.
    """
    root = Path(root)
    name = f"{CHECKPOINT_PREFIX}{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    is_main = accelerator is None or accelerator.is_main_process
    rank = 0 if accelerator is None else accelerator.process_index
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier(accelerator)

    if _uses_accelerate_state(accelerator):
        accelerator.save_state(str(tmp / "accelerate_state"), safe_serialization=True)
    else:
        if is_main:
            unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
            _save_model_weights(unwrapped, tmp / MODEL_FILE)
            if optimizer is not None:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if stage_hook is not None:
                stage_hook("mid_save")
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            scaler = getattr(accelerator, "scaler", None) if accelerator is not None else None
            if scaler is not None:
                torch.save(scaler.state_dict(), tmp / "scaler.pt")
    torch.save(capture_rng_state(), tmp / f"rng_state_{rank}.pt")
    _barrier(accelerator)

    if is_main:
        state = dict(trainer_state)
        state["step"] = step
        state["world_size"] = 1 if accelerator is None else accelerator.num_processes
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=2, sort_keys=True, default=str)
        write_manifest(tmp)
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): move the old copy out of the way first
            trash = root / f".tmp-old-{name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
        atomic_write_text(root / LATEST_FILE, name + "\n")
        if total_limit is not None and total_limit > 0:
            for old in list_checkpoints(root)[:-total_limit]:
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
    _barrier(accelerator)
    return final


def _save_model_weights(model: torch.nn.Module, path: Path) -> None:
    save_model(model, str(path))


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    accelerator: Any = None,
    restore_rng: bool = True,
    verify: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` / ``optimizer`` / ``scheduler`` (and the
    GradScaler of ``accelerator``), restore this process's RNG states, and return the trainer state.

    Restore the RNG last, right before training continues, for an exact resume (``restore_rng=False`` and
    :func:`restore_rng_state` let the caller do that). ``verify=False`` skips the manifest check (for a caller
    that has just run `verify_checkpoint`).

    Raises:
        CheckpointError: the folder does not match its manifest (`verify_checkpoint`) or its trainer state is not
            a JSON object; nothing is loaded then.
    """
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    try:
        with open(path / STATE_FILE, encoding="utf-8") as handle:
            state = json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path / STATE_FILE} is not valid JSON ({error})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE_FILE} holds a {type(state).__name__}, not the trainer state object")
    rank = 0 if accelerator is None else accelerator.process_index
    world = 1 if accelerator is None else accelerator.num_processes
    if state.get("world_size", world) != world:
        raise ValueError(
            f"{path} was written by {state.get('world_size')} processes; resume it with the same number "
            f"(got {world}) for an exact continuation"
        )
    if _uses_accelerate_state(accelerator):
        accelerator.load_state(str(path / "accelerate_state"))
    else:
        unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
        try:
            load_model(unwrapped, str(path / MODEL_FILE), strict=True)
        except RuntimeError as error:  # missing / unexpected / mis-shaped keys: another model's checkpoint
            raise CheckpointError(f"{path / MODEL_FILE} does not fit this model: {error}") from None
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        if scheduler is not None:
            scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
        scaler = getattr(accelerator, "scaler", None) if accelerator is not None else None
        if scaler is not None and (path / "scaler.pt").is_file():
            scaler.load_state_dict(torch.load(path / "scaler.pt", map_location="cpu", weights_only=True))
    rng_file = path / f"rng_state_{rank}.pt"
    state["_rng"] = torch.load(rng_file, map_location="cpu", weights_only=True)
    if restore_rng:
        restore_rng_state(state["_rng"])
    return state
