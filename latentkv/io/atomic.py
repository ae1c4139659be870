"""Outputs appear whole or not at all: write into a temp dir beside the target, then rename."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import LatentKVError

log = logging.getLogger(__name__)


def check_output_dir(out: str | Path, overwrite: bool, inputs: tuple = ()) -> Path:
    """Fail early (before any long work) if `out` exists and may not be replaced, if it is (or holds,
    or sits inside) one of the command's `inputs`, or if its parent cannot be written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise LatentKVError(f"output {out} already exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise LatentKVError(f"output {out} exists and is not a directory; remove it or choose another --out")
    for source in inputs:
        if source is not None and Path(source).exists() and _overlaps(out, Path(source)):
            raise LatentKVError(f"--out {out} is this command's input {source}; writing there would destroy what "
                                "is being read: choose another --out")
    _check_parent_writable(out)
    return out


def _overlaps(out: Path, source: Path) -> bool:
    a, b = out.resolve(), source.resolve()
    return a == b or a in b.parents or b in a.parents


def _check_parent_writable(out: Path) -> None:
    """The nearest existing ancestor must take a new directory: found now, not after an hour of work.
    A real probe (mkdir + rmdir), since access(2) says yes to root on read-only mounts and /proc."""
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LatentKVError(f"cannot create --out {out}: {parent} is a file, not a directory; choose another --out")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".latentkv-write-test-", dir=parent))
    except OSError as e:
        raise LatentKVError(f"cannot create --out {out}: {parent} does not take new folders ({e.strerror}); "
                            "choose a writable --out") from None


def write_file_atomic(path: str | Path, data: str | bytes) -> None:
    """Replace one file whole (temp file beside it, fsync, rename): readers never see half of it.
    The temp name carries the pid, so processes writing the same file do not collide."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False):
    """Yield a temp dir; on success it becomes `out` in one rename (see `publish_dir`), on failure it
    is removed."""
    out = Path(out).absolute()
    if out.parent.is_dir():
        clear_stale_temps(out)  # first: it may put back an output a killed run was replacing
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        publish_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(tmp: Path, out: Path, overwrite: bool = False) -> None:
    """Make the finished `tmp` (a sibling of `out`) appear as `out` in one rename.

    Without `overwrite` the rename never replaces anything: if `out` appeared while we worked (another
    writer, a user's folder), it is left untouched, `tmp` is kept as `OUT.unpublished-*` and the error
    says where. With `overwrite` an existing `out` is swapped out atomically and then removed.
    Modes follow the umask (mkdtemp makes 0700; the output should look like any other dir)."""
    tmp.chmod(0o777 & ~_umask())
    for f in tmp.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~_umask())
    if overwrite and out.is_dir() and _replace(tmp, out):
        return
    if not _rename_noreplace(tmp, out):
        kept = out.with_name(f"{out.name}.unpublished-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        tmp.rename(kept)
        raise LatentKVError(f"output {out} appeared while this run was writing it (another run with the same --out?); "
                            f"it was left untouched and this run's result is in {kept}: move it, or rerun with "
                            "--overwrite")


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst` only if nothing is at `dst` -> whether it was done. renameat2's
    RENAME_NOREPLACE checks and renames in one step; where it is missing, rename(2) still refuses a
    non-empty directory or a file, so at worst an empty directory (no data) is replaced."""
    done = _renameat2(src, dst, RENAME_NOREPLACE)
    if done is not None:
        return done
    if os.path.lexists(dst):
        return False
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            return False
        raise
    return True


def _replace(tmp: Path, out: Path) -> bool:
    """Swap `tmp` and `out` in one step (RENAME_EXCHANGE) and remove the old -> False if `out` vanished
    meanwhile. Where the kernel lacks it, move the old aside first (`.OUT.old-PID-*`, which
    `clear_stale_temps` puts back if we are killed)."""
    done = _renameat2(tmp, out, RENAME_EXCHANGE)
    if done is not None:
        if done:
            shutil.rmtree(tmp, ignore_errors=True)
        return done
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    out.rename(trash / out.name)
    tmp.rename(out)
    shutil.rmtree(trash, ignore_errors=True)
    return True


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flag: int) -> bool | None:
    """Linux renameat2(2) -> True (done), False (`dst` exists, or vanished for an exchange), None
    (not available on this platform or filesystem: the caller falls back)."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return None
    if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flag) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return None
    if err in (errno.EEXIST, errno.ENOENT) and src.exists():
        return False
    raise OSError(err, os.strerror(err), str(dst))


@contextlib.contextmanager
def exclusive(lock: Path, busy: str):
    """Hold an exclusive flock on the file `lock` while inside, or refuse at once with `busy` (the lock
    dies with the process, so a killed holder never blocks the next run); the file is removed after."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LatentKVError(f"{busy} (lock {lock}); wait for it to finish or choose another --out") from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


def clear_stale_temps(out: Path) -> list[Path]:
    """Tidy what a killed run left beside `out` (names carry the writer's pid; live writers are left
    alone): `.OUT.tmp-PID-*` is removed; `.OUT.old-PID-*/OUT` (killed mid-swap) is put back if `out`
    is missing, so an old output is never lost. -> the paths removed."""
    removed = []
    for kind in ("tmp", "old"):
        for p in sorted(out.parent.glob(f".{glob.escape(out.name)}.{kind}-*")):
            pid = p.name.rsplit(f".{kind}-", 1)[1].split("-")[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not out.exists() and (p / out.name).is_dir():
                (p / out.name).rename(out)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        log.info("removed %d leftover temporary dir(s) of an interrupted run beside %s", len(removed), out)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
