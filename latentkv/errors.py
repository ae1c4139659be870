"""The one exception type users see: a one-line message naming the problem and the fix."""

from __future__ import annotations

import errno
import os


class LatentKVError(Exception):
    """Bad input or a broken file. The CLI prints `error: <message>` and exits with code 2."""


def first_line(e: BaseException, width: int = 160) -> str:
    """What a deep library error says, in one line of at most `width` characters (its type when it says
    nothing): the part of it a one-line LatentKVError quotes."""
    text = str(e).strip()
    return text.splitlines()[0][:width] if text else type(e).__name__


WRITE_ERRORS = {"ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS"}


def write_error(e: OSError) -> str | None:
    """A one-line message for a failed write (disk full, no permission, read-only), else None."""
    if errno.errorcode.get(e.errno) not in WRITE_ERRORS:
        return None
    fix = "free disk space or choose another --out" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a writable --out"
    return (f"cannot write {e.filename or 'the output'}: {os.strerror(e.errno)}; {fix}, then rerun "
            "(outputs are never left half-written; a streaming conversion resumes)")
