"""Outputs appear whole or not at all: write into a temp dir beside the target, then rename."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import LatentKVError

log = logging.getLogger(__name__)


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before any long work) if `out` exists and may not be replaced."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise LatentKVError(f"output {out} already exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise LatentKVError(f"output {out} exists and is not a directory; remove it or choose another --out")
    return out


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
    """Yield a temp dir; on success it replaces `out` in one rename, on failure it is removed."""
    out = Path(out).absolute()
    if out.parent.is_dir():
        clear_stale_temps(out)  # first: it may put back an output a killed run was replacing
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(tmp: Path, out: Path) -> None:
    """Make the finished `tmp` (a sibling of `out`) appear as `out` in one rename, replacing any old one.
    Modes follow the umask (mkdtemp makes 0700; the output should look like any other dir)."""
    tmp.chmod(0o777 & ~_umask())
    for f in tmp.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~_umask())
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        out.rename(trash / out.name)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)


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
