"""The exception types for user mistakes and exhausted resources.

A `PeftlabError` is caught once, in the CLI, and printed as one line with a non-zero exit status.
Any other exception is a bug in peftlab and keeps its traceback. Running out of memory or disk is
not a bug either: `resource_errors` turns it into a `PeftlabError` that names the fix, so that a
sweep can record the cell as failed and go on.
"""

from __future__ import annotations

import contextlib
import errno
import sys


class PeftlabError(Exception):
    """A problem with the user's input, named together with its fix."""


class OutOfMemory(PeftlabError):
    """GPU or host memory ran out; the message names the settings that lower the need."""


class DiskFull(PeftlabError):
    """A write failed for lack of space; files written before it are intact (they are replaced atomically)."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (GPU), MemoryError, or torch's CPU allocator failing (a plain RuntimeError)."""
    torch = sys.modules.get("torch")  # not imported here: the CLI's argument errors must stay fast
    if isinstance(exc, MemoryError) or (torch is not None and isinstance(exc, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


@contextlib.contextmanager
def resource_errors(doing: str, memory_fix: str, disk_fix: str = "choose another --out"):
    """Re-raise out-of-memory and full-disk errors inside the block as OutOfMemory / DiskFull."""
    try:
        yield
    except DiskFull:
        raise
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        raise DiskFull(f"disk full while {doing} (writing{where}): free space on that disk or {disk_fix}; "
                       "files written before are intact") from None
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise OutOfMemory(f"out of memory while {doing}: {memory_fix}") from None
