"""Loading official X-VLM checkpoint files without executing pickled code.

Official checkpoints are `torch.save` pickles: `{'model': state_dict, 'config': dict}` (or a bare state dict).
They are opened with `torch.load(..., weights_only=True)`, whose restricted unpickler only rebuilds tensors and
plain containers (dict, list, tuple, str, numbers, None, OrderedDict). A file that needs anything else (a class,
a function, `os.system`, ...) is refused with `UnsafeCheckpointError`; it is never unpickled in full.
`.safetensors` files are read with `safetensors` (no pickle at all). A file that is not a readable checkpoint at
all (random bytes, a truncated or empty file, a damaged zip archive or safetensors header) raises
`CorruptCheckpointError` instead: it is damaged, not dangerous.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

__all__ = ["CorruptCheckpointError", "UnsafeCheckpointError", "load_official_checkpoint", "split_checkpoint"]


class UnsafeCheckpointError(RuntimeError):
    """The checkpoint needs full unpickling (arbitrary code execution) and was refused."""


class CorruptCheckpointError(ValueError):
    """The file cannot be read as a checkpoint: corrupt, truncated, empty, or not a checkpoint at all."""


_CORRUPT = (
    "{path!r} is not a readable checkpoint: it is corrupt, truncated, empty or not a torch.save / safetensors file "
    "({reason})"
)


_REFUSAL = (
    "Refusing to load {path!r}: it cannot be opened with torch.load(weights_only=True), because it contains pickled "
    "Python objects beyond tensors and plain containers ({reason}). Fully unpickling it would execute whatever code "
    "the file names, so the converter never does. Official X-VLM checkpoints only hold {{'model': state_dict, "
    "'config': dict}} and load safely. If you trust this file and know where it came from, extract the state dict "
    "in an isolated environment (torch.save(torch.load(path, weights_only=False)['model'], 'state_dict.pth')) and "
    "convert that file instead."
)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    for line in text.splitlines():
        line = line.strip()
        if "Unsupported global" in line or "GLOBAL" in line:
            return line
    return text.splitlines()[0] if text else type(error).__name__


def _unpickling_failure(path: str, error: pickle.UnpicklingError) -> Exception:
    """`UnsafeCheckpointError` when the pickle names a class or function (a GLOBAL the weights-only unpickler
    refuses); `CorruptCheckpointError` for anything else (bytes that are no valid pickle)."""
    text = str(error)
    if "GLOBAL" in text or "Unsupported global" in text:
        return UnsafeCheckpointError(_REFUSAL.format(path=path, reason=_first_line(error)))
    return CorruptCheckpointError(_CORRUPT.format(path=path, reason=_weights_only_reason(error)))


def _weights_only_reason(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith(("Unsupported", "invalid", "Weights only"))
                   and not line.startswith("Weights only load failed")), None)
    return f"{type(error).__name__}: {detail or (lines[0] if lines else 'no data')}"


def load_official_checkpoint(path: str | os.PathLike) -> Any:
    """Read a checkpoint file safely and return the loaded object (usually a dict).

    Raises:
        FileNotFoundError: the file does not exist.
        UnsafeCheckpointError: the pickle needs more than `weights_only=True` allows.
        CorruptCheckpointError: the file is no readable checkpoint (random bytes, truncated, empty).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file not found: {path!r}")
    if path.endswith(".safetensors"):
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise CorruptCheckpointError(_CORRUPT.format(path=path, reason=_first_line(error))) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as mmap_error:  # noqa: BLE001 - retried without mmap below, where the error is classified
        if isinstance(mmap_error, pickle.UnpicklingError):
            raise _unpickling_failure(path, mmap_error) from None
        # mmap only works for the zip format (torch >= 1.6); legacy files are read without it.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _unpickling_failure(path, error) from None
    except Exception as error:  # noqa: BLE001 - random bytes fail in many ways (OverflowError, MemoryError, ...)
        raise CorruptCheckpointError(_CORRUPT.format(path=path, reason=_weights_only_reason(error))) from None


def split_checkpoint(obj: Any, source: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Return `(state_dict, embedded_config)` from a loaded checkpoint (`{'model': ..., 'config': ...}` or a bare
    state dict). A `module.` prefix on every key (a DistributedDataParallel state dict) is removed. ``source`` (the
    file) is named in the errors."""
    where = f"{source!r}: " if source else ""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}a checkpoint must be a dict (state dict or {{'model': ...}}), got "
                         f"{type(obj).__name__}.")
    config = None
    if "model" in obj and isinstance(obj["model"], Mapping):
        state_dict = obj["model"]
        config = obj.get("config") if isinstance(obj.get("config"), Mapping) else None
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        state_dict = obj["state_dict"]
    else:
        state_dict = obj
    bad = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(
            f"{where}the state dict has entries that are not tensors: {bad[:20]}{' ...' if len(bad) > 20 else ''}. "
            "Pass an official X-VLM checkpoint ({'model': state_dict, 'config': ...}) or a bare state dict."
        )
    state_dict = dict(state_dict)
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict, (dict(config) if config is not None else None)
