"""Writing a bundle into place: one `edge convert` per output at a time (a lock file beside it), the bundle built
in a temporary folder and renamed into place whole, and what a killed convert left behind cleared away."""

from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NoReturn


class ConvertError(ValueError):
    """The conversion cannot go ahead or produced a graph that does not match torch."""


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold the lock file `.NAME.lock` beside `out` for a whole conversion: a second `edge convert -o NAME`
    fails at once instead of replacing this one's bundle at the end. The kernel drops an flock when its process
    dies, so a convert killed outright (SIGKILL, power loss) blocks nobody; its leftover file is reused."""
    lock = out.parent / f".{out.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise ConvertError(f"another `edge convert`{pid} is writing {out}; wait for it to finish or choose "
                               f"another -o (its lock: {lock})") from None
        if _same_file(fd, lock):
            break
        os.close(fd)  # the holder finished and removed this file between our open and our lock: lock anew
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still locked: whoever opened this file retries on a fresh one
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def remove_stale_partials(out: Path) -> None:
    """Folders an earlier convert to `out` left when it was killed outright (SIGKILL, power loss). Called under
    the lock, so no convert of this version is writing one; a folder whose process is alive is kept all the
    same (a convert from before the lock, or the pid reused), never deleted from under a running convert."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """The finished bundle becomes `out` (under the lock). Without `overwrite`, whatever appeared at `out`
    since the start (made by hand or by a convert that takes no lock) is left as it is, and the new bundle is
    kept beside it."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            _keep_beside(tmp, out)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)  # refuses a non-empty folder or a file made at `out` since the check
    except OSError:
        _keep_beside(tmp, out)


def _keep_beside(tmp: Path, out: Path) -> NoReturn:
    kept = out.parent / f"{out.name}.new-{os.getpid()}"
    os.rename(tmp, kept)
    raise ConvertError(f"{out} appeared while converting and was left as it is (pass --overwrite to replace it); "
                       f"the new bundle is at {kept}")
