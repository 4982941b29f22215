"""Files that other processes may read or write at any moment.

The tools, each written once:

* :func:`replacing` and :func:`atomic_write_text`: a new file is written as a
  temporary file beside the target (``.<name>.<16 hex digits><suffix>``),
  flushed to disk, renamed over the target with ``os.replace`` and the folder
  is synced; a reader sees the old file or the new one, never half of one,
  and a kill at any moment leaves at most a temporary file behind.
* :func:`replacing_folder` and :func:`replace_folder`: the same for a folder (a
  SavedModel, the extracted CIFAR-10 files): written beside the target, renamed into
  place when complete, the folder it replaces removed only then.
* :func:`exclusive_lock`: ``flock(LOCK_EX)`` on a lock file (the ``filelock``
  library), released when the block ends or the process dies. The lock file
  stays in place, so every waiter locks the same inode.

No TensorFlow and no HDF5 here: checkpoint.py, data.py, history.py and
experiment.py build on it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import filelock

# fsync of a folder is not supported everywhere (some network and FUSE file
# systems); that is no error of the write.
_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF)


# Why a write fails that the user can act on, in the words of strerror(3).
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                 errno.EFBIG, errno.EIO)


def write_failure_reason(error: BaseException, folder=None) -> str:
    """Why writing into ``folder`` failed, in words ("no space left on device",
    "read-only file system", "permission denied", ...).

    From the error's errno, else from the text of its message (TensorFlow reports
    ``<file>; No space left on device`` deep inside a "Graph execution error"),
    else from the state of ``folder`` (no free blocks, mounted read-only, not
    writable), else the message's own last words."""
    code = getattr(error, "errno", None)
    if code in _WRITE_ERRNOS:
        return os.strerror(code).lower()
    text = str(error)
    for code in _WRITE_ERRNOS:
        if os.strerror(code).lower() in text.lower():
            return os.strerror(code).lower()
    if folder is not None:
        try:
            st = os.statvfs(folder)
            if st.f_flag & os.ST_RDONLY:
                return os.strerror(errno.EROFS).lower()
            if st.f_bavail == 0:
                return os.strerror(errno.ENOSPC).lower()
            if not os.access(folder, os.W_OK):
                return os.strerror(errno.EACCES).lower()
        except OSError:
            pass
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    said = [line.rsplit("; ", 1)[-1] for line in lines if "; " in line]
    return (said or lines or [type(error).__name__])[0]


class LockBusy(Exception):
    """Another process (or another holder in this one) has the lock."""


def fsync_file(path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder) -> None:
    """Sync a folder's entries (a rename in it); OSError unless the file system
    cannot sync folders at all."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def temp_pattern(path, suffix: str = ".tmp") -> re.Pattern:
    """The names of :func:`replacing`'s temporary files for ``path``."""
    return re.compile(r"\." + re.escape(Path(path).name) + r"\.[0-9a-f]{16}"
                      + re.escape(suffix) + r"\Z")


def new_temp(path, suffix: str = ".tmp") -> Path:
    """Create a new empty temporary file beside ``path`` (never an existing one)."""
    path = Path(path)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}{suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


def remove_quietly(path) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def remove_stale_temps(path, suffix: str = ".tmp") -> None:
    """Remove temporary files of ``path`` left by a killed writer; call it only
    while holding the lock that every writer of ``path`` takes."""
    path = Path(path)
    pattern = temp_pattern(path, suffix)
    try:
        entries = os.listdir(path.parent)
    except OSError:
        return
    for entry in entries:
        if pattern.match(entry):
            remove_quietly(path.parent / entry)


@contextlib.contextmanager
def replacing(path, *, suffix: str = ".tmp", mode: int | None = None) -> Iterator[Path]:
    """Yield the path of a new empty temporary file beside ``path``; when the block
    ends normally, sync it, give it ``mode`` (if set), rename it over ``path`` and
    sync the folder. If the block raises, the temporary file is removed and
    ``path`` is left as it was. OSError from creating, syncing or renaming
    propagates (the target is unchanged unless only the folder sync failed)."""
    path = Path(path)
    tmp = new_temp(path, suffix)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_dir(path.parent)


def replace_folder(new, path) -> None:
    """Rename the folder ``new`` to ``path`` (on the same file system), replacing
    whatever ``path`` holds, in one rename as readers see it.

    rename(2) cannot replace a folder that has entries, so an existing ``path`` is
    first moved aside into a hidden ``.<name>.*.old`` folder beside it, removed once
    ``new`` is in place, and moved back if that rename fails (OSError propagates).
    A kill in between leaves at most that hidden folder, and ``path`` either absent
    or complete."""
    new, path = Path(new), Path(path)
    aside = None
    if os.path.lexists(path):
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, aside / path.name)
    try:
        os.replace(new, path)
    except OSError:
        if aside is not None and not os.path.lexists(path):
            os.replace(aside / path.name, path)
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(path.parent)


@contextlib.contextmanager
def replacing_folder(path) -> Iterator[Path]:
    """Yield a path (not yet created) beside ``path`` for a new folder; when the block
    ends normally it replaces ``path`` (:func:`replace_folder`). If the block raises,
    what it wrote is removed and ``path`` is left as it was; a kill leaves at most a
    hidden ``.<name>.*.tmp`` folder beside it."""
    path = Path(path)
    holder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield holder / path.name
        replace_folder(holder / path.name, path)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_write_bytes(path, *, suffix: str = ".tmp", mode: int | None = None):
    """Like :func:`replacing`, yielding the temporary file open for binary writing."""
    with replacing(path, suffix=suffix, mode=mode) as tmp, open(tmp, "wb") as out:
        yield out


@contextlib.contextmanager
def exclusive_lock(path, timeout: float = 0.0) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block.

    ``timeout``: seconds to wait for another holder to let go (0: do not wait);
    :class:`LockBusy` when it does not in time. The kernel releases the lock
    when the holder dies, so a killed process never leaves a stale lock.
    Another lock of the same file in the same process counts as another holder.
    """
    lock = filelock.FileLock(os.fspath(path), timeout=timeout, poll_interval=0.005,
                             fallback_to_soft=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise LockBusy(str(path)) from None
    try:
        yield
    finally:
        lock.release()
