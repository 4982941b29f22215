"""Where CIFAR-10 comes from: the folder to read, and the download when there is none.

:func:`find_data_dir` looks at ``--data-dir``, then ``$RESNET_GRAPH_DATA_DIR``,
then (for ``eval`` and ``--resume``) the folder the run was trained on, then the
user cache, and downloads the official binary archive into the cache when it is
missing (:func:`download_cifar10`): https only (no redirect to
another scheme), a size limit, the MD5 checked before anything is unpacked,
and an extraction that refuses absolute paths, ``..``, links and devices.
Reading and splitting the files is resnet_graph.data's job.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from resnet_graph import __version__, data, fsutil
from resnet_graph.data import BIN_FOLDER, HINT_DATA_DIR, TEST_FILE, TRAIN_FILES
from resnet_graph.errors import DataError

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
OFFICIAL_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
OFFICIAL_SIZE = 170052171  # bytes of cifar-10-binary.tar.gz

ENV_DATA_DIR = "RESNET_GRAPH_DATA_DIR"
CACHE_SUBDIR = "resnet-graph"

# Limits that keep a hostile or broken download from filling the disk.
_MAX_DOWNLOAD_BYTES = 1 << 31  # used only when the archive size is not known
_MAX_EXTRACT_BYTES = 1 << 30  # the official archive unpacks to ~185 MB
_MAX_ARCHIVE_MEMBERS = 10000
_CHUNK_BYTES = 1 << 20

_HINT_DOWNLOAD = "download it by hand and pass --data-dir PATH"


# --------------------------------------------------------------------------- finding the data


def default_cache_dir() -> Path:
    """The user cache for downloads: ``$XDG_CACHE_HOME/resnet-graph`` or ``~/.cache/resnet-graph``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / CACHE_SUBDIR


def find_data_dir(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    progress: bool = True,
    url: str = OFFICIAL_URL,
    md5: str | None = OFFICIAL_MD5,
    cache_dir: str | os.PathLike | None = None,
    allow_insecure: bool = False,
    saved_dir: str | os.PathLike | None = None,
) -> Path:
    """Return the folder that holds the CIFAR-10 files, downloading them if needed.

    Looks, in order, at ``data_dir``, then ``$RESNET_GRAPH_DATA_DIR``, then
    ``saved_dir`` (the folder a run recorded in its config.json: ``eval`` and
    ``--resume`` read the run's own data when nothing else is named; skipped
    when it no longer holds the files, as on another machine), then the
    user cache (``cache_dir`` or :func:`default_cache_dir`). A given folder may
    hold the files itself or be the parent of ``cifar-10-batches-bin/`` (or
    ``cifar-10-batches-py/``); the folder with the files is returned. A folder
    the user named is never replaced by another: if it lacks a file, that is an
    error. The cache uses ``cifar-10-batches-bin/`` when complete and otherwise
    downloads the archive with :func:`download_cifar10` (if ``download``).

    Raises:
        DataError: naming the missing file or folder, or why the download failed.
    """
    if data_dir is not None and str(data_dir) != "":
        return data.resolve_folder(Path(data_dir).expanduser(), "")[0]
    env_dir = os.environ.get(ENV_DATA_DIR, "")
    if env_dir:
        return data.resolve_folder(Path(env_dir).expanduser(), f" (from ${ENV_DATA_DIR})")[0]
    if saved_dir is not None and str(saved_dir) != "":
        try:
            return data.resolve_folder(Path(saved_dir), "")[0]
        except (DataError, OSError):   # gone, or not ours to read (another user's home)
            pass

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = cache / BIN_FOLDER
    if data.first_missing(folder, TRAIN_FILES + (TEST_FILE,)) is None:
        return folder.resolve()
    if not download:
        raise DataError(f"CIFAR-10 is not in {folder} and downloading is off; {HINT_DATA_DIR}")
    folder = download_cifar10(cache, url=url, md5=md5, progress=progress, allow_insecure=allow_insecure)
    return folder.resolve()


# --------------------------------------------------------------------------- download


class _SchemeCheckingRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to schemes the caller allowed (no https -> http downgrade)."""

    def __init__(self, allowed: tuple[str, ...]):
        super().__init__()
        self._allowed = allowed

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in self._allowed:
            fp.close()
            raise urllib.error.URLError(f"refused redirect to {scheme}:// URL")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download_cifar10(
    cache_dir: str | os.PathLike,
    *,
    url: str = OFFICIAL_URL,
    md5: str | None = OFFICIAL_MD5,
    expected_size: int | None = None,
    progress: bool = True,
    timeout: float = 60,
    allow_insecure: bool = False,
) -> Path:
    """Download, verify and unpack the CIFAR-10 binary archive into ``cache_dir``.

    The archive goes to a temporary file in ``cache_dir``; its size (when known)
    and MD5 are checked before it is opened. It is unpacked into a temporary
    folder after every member has been checked (only regular files and folders,
    no absolute paths, no ``..``), and the finished ``cifar-10-batches-bin``
    folder is then moved into place with one rename. Whatever happens, the
    temporary files are removed, so a failure leaves nothing half-written.

    Args:
        cache_dir: where ``cifar-10-batches-bin/`` ends up (created if needed).
        url: the archive; only ``https://`` unless ``allow_insecure``, which also
            permits ``http://`` and ``file://`` (for tests and local mirrors).
        md5: expected MD5 of the archive (hex). Required: an unverified archive
            is never unpacked.
        expected_size: expected size in bytes; ``None`` means ``OFFICIAL_SIZE``
            for ``OFFICIAL_URL`` and unknown for any other URL.
        progress: show a progress bar on stderr (only if stderr is a terminal).
        timeout: seconds to wait on the network before giving up.

    Returns:
        The path of the extracted ``cifar-10-batches-bin`` folder.

    Raises:
        DataError: on any failure, saying to download the archive by hand.
    """
    allowed = ("https", "http", "file") if allow_insecure else ("https",)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in allowed:
        raise DataError(f"refusing to download CIFAR-10 from {url}: only https:// URLs are allowed; {_HINT_DOWNLOAD}")
    if not md5:
        raise DataError(
            f"refusing to download CIFAR-10 from {url} without an MD5 to check it against; {_HINT_DOWNLOAD}"
        )
    if expected_size is None and url == OFFICIAL_URL:
        expected_size = OFFICIAL_SIZE

    cache = Path(cache_dir).expanduser()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create the cache folder {cache} ({data.reason(error)}); {_HINT_DOWNLOAD}") from error

    archive: Path | None = None
    workdir: Path | None = None
    try:
        handle, name = tempfile.mkstemp(prefix=".cifar-10-download-", suffix=".tar.gz.part", dir=cache)
        archive = Path(name)
        with os.fdopen(handle, "wb") as out:
            size, digest = _fetch(url, out, allowed, expected_size, progress, timeout)
        if expected_size is not None and size != expected_size:
            raise DataError(f"the download from {url} has {size} bytes, expected {expected_size}; {_HINT_DOWNLOAD}")
        if digest != md5.lower():
            raise DataError(f"the download from {url} has MD5 {digest}, expected {md5.lower()}; {_HINT_DOWNLOAD}")

        workdir = Path(tempfile.mkdtemp(prefix=".cifar-10-extract-", dir=cache))
        _safe_extract(archive, workdir / "archive", url)
        extracted = workdir / "archive" / BIN_FOLDER
        missing = data.first_missing(extracted, TRAIN_FILES + (TEST_FILE,))
        if missing is not None:
            raise DataError(
                f"the archive from {url} lacks {BIN_FOLDER}/{missing.name}: not the CIFAR-10 binary version; "
                f"{_HINT_DOWNLOAD}"
            )
        target = cache / BIN_FOLDER
        fsutil.replace_folder(extracted, target)   # an incomplete folder there goes
        return target
    except DataError:
        raise
    except (OSError, tarfile.TarError, EOFError, zlib.error, http.client.HTTPException, ValueError) as error:
        if isinstance(error, urllib.error.HTTPError):
            error.close()  # it holds the open response
        raise DataError(f"could not download CIFAR-10 from {url} ({data.reason(error)}); {_HINT_DOWNLOAD}") from error
    finally:
        if archive is not None:
            with contextlib.suppress(OSError):
                archive.unlink()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _fetch(url, out, allowed, expected_size, progress, timeout) -> tuple[int, str]:
    """Stream ``url`` into ``out``; return (bytes written, hex MD5)."""
    opener = urllib.request.build_opener(_SchemeCheckingRedirects(allowed))
    request = urllib.request.Request(url, headers={"User-Agent": f"resnet-graph/{__version__}"})
    limit = expected_size if expected_size is not None else _MAX_DOWNLOAD_BYTES
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    with opener.open(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length", "")
        total = int(length) if length.isdigit() else None
        if total is not None and (total > limit or (expected_size is not None and total != expected_size)):
            expected = f"expected {expected_size}" if expected_size is not None else f"expected at most {limit}"
            raise DataError(f"the download from {url} has {total} bytes, {expected}; {_HINT_DOWNLOAD}")
        stderr = sys.stderr
        show = progress and stderr is not None and stderr.isatty()
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=Path(urllib.parse.urlsplit(url).path).name or "CIFAR-10",
            disable=not show,
            file=stderr,
            leave=False,
        ) as bar:
            while True:
                chunk = response.read(_CHUNK_BYTES)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise DataError(f"the download from {url} is larger than {limit} bytes; {_HINT_DOWNLOAD}")
                digest.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
    return size, digest.hexdigest()


def _safe_extract(archive: Path, dest: Path, url: str) -> None:
    """Unpack ``archive`` into the new folder ``dest`` after checking every member.

    All members are checked before the first byte is written, so a refused
    archive leaves nothing behind. Files are written by this code (never by
    ``tarfile.extract``), so no link, device, owner or mode from the archive
    ever reaches the disk.
    """
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        if len(members) > _MAX_ARCHIVE_MEMBERS:
            raise DataError(f"the archive from {url} has {len(members)} members, too many; {_HINT_DOWNLOAD}")
        planned: list[tuple[tarfile.TarInfo, tuple[str, ...]]] = []
        total = 0
        for member in members:
            parts = _safe_member_parts(member, url)
            total += member.size if member.isreg() else 0
            if total > _MAX_EXTRACT_BYTES:
                raise DataError(
                    f"the archive from {url} unpacks to more than {_MAX_EXTRACT_BYTES} bytes; {_HINT_DOWNLOAD}"
                )
            planned.append((member, parts))

        dest.mkdir()
        for member, parts in planned:
            target = dest.joinpath(*parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:  # cannot happen for a regular file; be explicit anyway
                raise DataError(f"the archive from {url} has an unreadable member {member.name!r}; {_HINT_DOWNLOAD}")
            with source, open(target, "xb") as sink:  # "x": never write through anything already there
                shutil.copyfileobj(source, sink, _CHUNK_BYTES)


def _safe_member_parts(member: tarfile.TarInfo, url: str) -> tuple[str, ...]:
    """The path components of a member, or DataError if it is not safe to unpack."""
    name = member.name

    def refuse(why: str):
        return DataError(f"the archive from {url} has an unsafe member {name!r} ({why}); {_HINT_DOWNLOAD}")

    if not (member.isreg() or member.isdir()):
        kind = "symlink" if member.issym() else "hard link" if member.islnk() else "device or special file"
        raise refuse(kind)
    if not name or "\x00" in name or "\\" in name:
        raise refuse("bad name")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise refuse("absolute path")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise refuse("'..' in path")
    parts = tuple(part for part in parts if part != ".")
    if not parts and not member.isdir():
        raise refuse("bad name")
    return parts


