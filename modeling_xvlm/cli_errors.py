"""The error contract of the command-line tools (``xvlm-train``, ``xvlm-eval``, ``xvlm-data``, ``xvlm-convert``).

Bad input (a file that is missing, unreadable, corrupt, truncated, of the wrong kind or refused as unsafe; a
folder that cannot be written; an option value that cannot work) ends in one line ``<prog>: error: <message>`` on
stderr and exit status 2, never a traceback. Set ``XVLM_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
from collections.abc import Callable
from typing import Any

from safetensors import SafetensorError

__all__ = ["BAD_INPUT_ERRORS", "cli_errors", "ensure_writable_dir", "report_bad_input"]

#: What a command turns into its one-line error: I/O and format errors, invalid values (ValueError, which the
#: package's own errors such as `CheckpointError` and `ConversionError` derive from), truncated or refused pickles.
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, EOFError, pickle.UnpicklingError,
                                                      SafetensorError)


def report_bad_input(prog: str, error: BaseException | str) -> int:
    """Print ``prog: error: message`` (one line) on stderr; return the exit status 2."""
    text = " ".join(str(error).split()) or type(error).__name__
    print(f"{prog}: error: {text}", file=sys.stderr)
    return 2


def cli_errors(prog: str, extra: tuple[type[BaseException], ...] = ()) -> Callable:
    """Decorator of a command's ``main``: `BAD_INPUT_ERRORS` (and ``extra``) and ``SystemExit("message")`` become
    `report_bad_input` and exit status 2; everything else propagates."""
    caught = BAD_INPUT_ERRORS + tuple(extra)

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapper(*args: Any, **kwargs: Any) -> int:
            try:
                return main(*args, **kwargs)
            except SystemExit as exit_:
                if isinstance(exit_.code, str) and not os.environ.get("XVLM_DEBUG"):
                    return report_bad_input(prog, exit_.code)
                raise
            except caught as error:
                if os.environ.get("XVLM_DEBUG"):
                    raise
                return report_bad_input(prog, error)

        return wrapper

    return decorate


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> None:
    """Create ``path`` (and its parents) and check that a file can be written in it, so that a run fails at its
    start rather than at its first save. Raises ``PermissionError`` / ``NotADirectoryError`` naming ``path``."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{what} {path!r} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".xvlm-write-test-{os.getpid()}")
        with open(probe, "w", encoding="utf-8") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise PermissionError(f"{what} {path!r} is not writable ({error.strerror or error})") from None


def require_model_source(value: str, what: str = "--model") -> None:
    """Fail clearly when `value` is written as a local path (absolute, `./`, `../`, `~`, or more than the one `/` of
    a Hub id `org/name`) that does not exist, instead of letting the Hub client reject it as a malformed repo id."""
    looks_local = os.path.isabs(value) or value.startswith((".", "~")) or value.count("/") > 1 or "\\" in value
    if looks_local and not os.path.exists(os.path.expanduser(value)):
        raise FileNotFoundError(f"{what} {value!r}: no such folder (a Hub id is written 'org/name')")

