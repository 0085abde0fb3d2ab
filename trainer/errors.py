"""User errors: a bad input the user can fix, reported as one clear message instead of a traceback.

Everything steerflow refuses on purpose (config validation, config drift, a corrupt checkpoint, an
unreadable prompts file, a full or read-only disk) raises ``UserError`` (or a subclass) with a message
that names the key or file, the value and the fix. The entry points (launch/train.py, sample.py,
export.py) run under ``reporting_user_errors``: a UserError prints ``error: <message>`` and exits with
``EXIT_USER_ERROR``; any other exception is a bug and keeps its traceback. ``STEERFLOW_DEBUG=1`` (or
``hydra.verbose=true``) prints the traceback of user errors too.
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback

EXIT_USER_ERROR = 2  # 1 is a crash (or Hydra's own compose error), 75 a preemption (trainer/preemption.py)
DEBUG_ENV = "STEERFLOW_DEBUG"

# OS errors that are the machine's state, not a bug: the disk is full, read-only or not ours.
_DISK_ERRNOS = {
    errno.ENOSPC: "no space left on the device (ENOSPC): free space there or point the output elsewhere",
    errno.EDQUOT: "disk quota exceeded (EDQUOT): free space there or point the output elsewhere",
    errno.EROFS: "the file system is read-only (EROFS): choose a writable folder",
    errno.EACCES: "permission denied (EACCES): choose a folder you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted (EPERM): choose a folder you can write to, or fix its permissions",
}


class UserError(Exception):
    """A bad input or machine state the user can fix; the message says what, where and how."""


def disk_error(exc: BaseException) -> UserError | None:
    """A UserError naming the file and the cause if ``exc`` (or what caused it) is a full, read-only or
    forbidden disk; None for any other error (those are bugs and keep their tracebacks)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_ERRNOS:
            where = seen.filename if seen.filename is not None else "(file not named by the OS)"
            return UserError(f"cannot write {where}: {_DISK_ERRNOS[seen.errno]}")
        seen = seen.__cause__ or seen.__context__
    return None


def debug_requested(verbose: bool = False) -> bool:
    return verbose or os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")


@contextlib.contextmanager
def reporting_user_errors(verbose: bool = False, rank: int | None = None):
    """Turn a UserError (or a full/read-only disk) raised inside into one message on stderr and
    ``sys.exit(EXIT_USER_ERROR)``; everything else propagates with its traceback.

    Used inside the Hydra task function, so Hydra's own handler (which wraps any exception in a
    stack trace plus its HYDRA_FULL_ERROR hint) never sees steerflow's clear errors.
    """
    try:
        yield
    except UserError as e:
        _exit(e, e, verbose, rank)
    except OSError as e:
        translated = disk_error(e)
        if translated is None:
            raise
        _exit(translated, e, verbose, rank)


def _exit(error: UserError, original: BaseException, verbose: bool, rank: int | None) -> None:
    if debug_requested(verbose):
        traceback.print_exception(original)
    prefix = f"[rank {rank}] " if rank else ""
    hint = "" if debug_requested(verbose) else f" (set {DEBUG_ENV}=1 for the traceback)"
    print(f"{prefix}error: {error}{hint}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
