"""CIFAR-10 on disk: find, download, verify, parse, split, normalise and augment.

Everything here is plain numpy and the standard library so that the data path
can be tested (and used by plotting or tooling) without TensorFlow.

The project reads the official *binary* layout: six files of 3073-byte records
(one label byte, then 1024 red, 1024 green and 1024 blue pixel bytes, each a
row-major 32x32 plane). The official *python* layout (pickled dicts) is read
too, through an unpickler that only rebuilds numpy arrays, because a pickle
can otherwise run any code on load.

Images leave this module as ``uint8`` arrays ``[N, 32, 32, 3]`` (HWC, pixel
units 0..255) and labels as ``int32`` ``[N]`` in 0..9. Normalisation statistics
are returned in pixel units so the graph can apply them to the raw bytes.

Every failure a user can fix raises :class:`~resnet_graph.errors.DataError`
with a one-line message that says what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib
import io
import math
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from resnet_graph import __version__
from resnet_graph.errors import DataError
from resnet_graph.fsutil import atomic_write_bytes

CLASS_NAMES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (32, 32, 3)  # height, width, channels of every image this module returns

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
OFFICIAL_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
OFFICIAL_SIZE = 170052171  # bytes of cifar-10-binary.tar.gz

BIN_FOLDER = "cifar-10-batches-bin"  # the folder inside the official binary archive
PY_FOLDER = "cifar-10-batches-py"  # the folder inside the official python archive
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
META_FILE = "batches.meta.txt"
PY_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
PY_TEST_FILE = "test_batch"

ENV_DATA_DIR = "RESNET_GRAPH_DATA_DIR"
CACHE_SUBDIR = "resnet-graph"

RECORD_BYTES = 1 + 32 * 32 * 3  # one label byte, then the CHW pixels
MAX_RECORDS = 60000  # the whole data set; a bigger file is not a CIFAR-10 batch

# Limits that keep a hostile or broken download from filling the disk.
_MAX_DOWNLOAD_BYTES = 1 << 31  # used only when the archive size is not known
_MAX_EXTRACT_BYTES = 1 << 30  # the official archive unpacks to ~185 MB
_MAX_ARCHIVE_MEMBERS = 10000
_CHUNK_BYTES = 1 << 20

_HINT_DATA_DIR = "pass --data-dir PATH to a folder with the CIFAR-10 binary files"
_HINT_DOWNLOAD = "download it by hand and pass --data-dir PATH"
_HINT_BAD_FILE = "replace the file with an official copy or " + _HINT_DATA_DIR


# --------------------------------------------------------------------------- containers


@dataclass(frozen=True, eq=False)
class Split:
    """One part of the data set: images and their labels, in a fixed order.

    Attributes:
        images: ``uint8`` array ``[N, 32, 32, 3]``, HWC, pixel units 0..255.
        labels: ``int32`` array ``[N]`` with values in 0..9 (see ``CLASS_NAMES``).

    The arrays are shared, not copied: treat them as read-only. Integer labels
    of another dtype are converted to ``int32``; anything else that breaks the
    contract raises ``ValueError`` here, so a bad split fails where it is made
    and not deep inside a training step.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise ValueError(f"Split images must be a uint8 numpy array, got {_describe_array(images)}")
        if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"Split images must have shape [N, 32, 32, 3], got {images.shape}")
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu" or labels.ndim != 1:
            raise ValueError(f"Split labels must be a 1-D integer array, got {_describe_array(labels)}")
        if len(labels) != len(images):
            raise ValueError(f"Split has {len(images)} images but {len(labels)} labels")
        if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise ValueError(f"Split labels must be in 0..{NUM_CLASSES - 1}")
        object.__setattr__(self, "labels", labels.astype(np.int32, copy=False))

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class Cifar10:
    """The three splits and the normalisation statistics of the training split.

    Attributes:
        train, valid, test: the splits; ``valid`` is held out of the official
            training files, ``test`` is the official test file.
        mean, std: per-channel (R, G, B) mean and population standard deviation
            of ``train`` in pixel units 0..255. They come from the training
            split only, so nothing about validation or test leaks into training.
        data_dir: the folder the files were read from.
    """

    train: Split
    valid: Split
    test: Split
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    data_dir: str


# --------------------------------------------------------------------------- file formats


def read_binary_batch(path: str | os.PathLike) -> Split:
    """Read one file of the official binary format (e.g. ``data_batch_1.bin``).

    The size is checked before anything is read, so a truncated, foreign or
    huge file is refused cheaply.

    Raises:
        DataError: the file is missing, empty, not a whole number of 3073-byte
            records, holds more than ``MAX_RECORDS`` records, or has a label
            byte above 9.
    """
    path = Path(path)
    size = _file_size(path)
    if size == 0:
        raise DataError(f"{path} is empty: truncated or not a CIFAR-10 binary batch; {_HINT_BAD_FILE}")
    if size % RECORD_BYTES:
        raise DataError(
            f"{path} has {size} bytes, not a multiple of {RECORD_BYTES}: "
            f"truncated or not a CIFAR-10 binary batch; {_HINT_BAD_FILE}"
        )
    count = size // RECORD_BYTES
    if count > MAX_RECORDS:
        raise DataError(
            f"{path} is oversized: {count} records, more than the {MAX_RECORDS} of all CIFAR-10; "
            f"{_HINT_BAD_FILE}"
        )
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise DataError(f"cannot read {path} ({_reason(error)}); {_HINT_DATA_DIR}") from error
    if raw.size != size:  # the file changed between stat and read
        raise DataError(f"{path} changed while it was read; {_HINT_BAD_FILE}")
    records = raw.reshape(count, RECORD_BYTES)
    labels = records[:, 0]
    _check_labels(path, labels)
    images = records[:, 1:].reshape(count, 3, 32, 32).transpose(0, 2, 3, 1)
    return Split(np.ascontiguousarray(images), labels.astype(np.int32))


def write_binary_batch(path: str | os.PathLike, images: np.ndarray, labels) -> None:
    """Write images and labels as one file of the official binary format.

    The inverse of :func:`read_binary_batch`; tests use it to build small data
    folders. The file appears atomically (written beside it, then renamed), so
    a reader never sees half a file.

    Args:
        path: the file to write; its folder is created if needed.
        images: ``uint8`` ``[N, 32, 32, 3]``.
        labels: ``N`` integers in 0..9.
    """
    split = Split(np.asarray(images), np.asarray(labels))
    records = np.empty((len(split), RECORD_BYTES), dtype=np.uint8)
    records[:, 0] = split.labels
    records[:, 1:] = split.images.transpose(0, 3, 1, 2).reshape(len(split), -1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write_bytes(path, suffix=".part", mode=0o644) as out:
        out.write(records.tobytes())


def read_python_batch(path: str | os.PathLike) -> Split:
    """Read one file of the official python format (e.g. ``data_batch_1``).

    The file is a pickled dict with ``b"data"`` (``uint8`` ``[N, 3072]``, CHW
    rows) and ``b"labels"`` (N integers). It is unpickled with an allow-list
    that only rebuilds numpy arrays, so a crafted file cannot run code.

    Raises:
        DataError: the file is missing, refers to any other class, is not such
            a dict, or its shapes or labels are wrong.
    """
    path = Path(path)
    size = _file_size(path)
    if size == 0:
        raise DataError(f"{path} is empty: truncated or not a CIFAR-10 python batch; {_HINT_BAD_FILE}")
    if size > 2 * MAX_RECORDS * RECORD_BYTES:
        raise DataError(f"{path} is oversized ({size} bytes) for a CIFAR-10 python batch; {_HINT_BAD_FILE}")
    try:
        payload = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path} ({_reason(error)}); {_HINT_DATA_DIR}") from error
    try:
        batch = _RestrictedUnpickler(io.BytesIO(payload), path).load()
    except DataError:
        raise
    except Exception as error:  # a malformed pickle can raise almost anything
        raise DataError(
            f"{path} is not a readable CIFAR-10 python batch ({_reason(error)}); {_HINT_BAD_FILE}"
        ) from error

    if not isinstance(batch, dict):
        raise DataError(f"{path} does not hold a dict: not a CIFAR-10 python batch; {_HINT_BAD_FILE}")

    def field(name: str):
        for key in (name.encode(), name):  # bytes keys in the official files, str keys if re-pickled
            if key in batch:
                return batch[key]
        raise DataError(f"{path} has no {name!r} entry: not a CIFAR-10 python batch; {_HINT_BAD_FILE}")

    rows, labels = field("data"), field("labels")
    if not isinstance(rows, np.ndarray) or rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3072:
        raise DataError(
            f"{path} 'data' must be uint8 [N, 3072], got {_describe_array(rows)}: "
            f"not a CIFAR-10 python batch; {_HINT_BAD_FILE}"
        )
    count = rows.shape[0]
    if count == 0 or count > MAX_RECORDS:
        raise DataError(f"{path} holds {count} images, expected 1 to {MAX_RECORDS}; {_HINT_BAD_FILE}")
    try:
        labels = np.asarray(labels)
    except Exception as error:
        raise DataError(f"{path} 'labels' is not a list of integers; {_HINT_BAD_FILE}") from error
    if labels.dtype.kind not in "iu" or labels.shape != (count,):
        raise DataError(
            f"{path} 'labels' must be {count} integers, got {_describe_array(labels)}; {_HINT_BAD_FILE}"
        )
    _check_labels(path, labels)
    images = rows.reshape(count, 3, 32, 32).transpose(0, 2, 3, 1)
    return Split(np.ascontiguousarray(images), labels.astype(np.int32))


def _numpy_core_module(name: str):
    """numpy's private ``multiarray``/``numeric`` module (``numpy._core`` in 2.x, ``numpy.core`` in 1.x)."""
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:  # numpy 1.x without the numpy._core alias
        return importlib.import_module(f"numpy.core.{name}")


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """Stand-in for ``_codecs.encode`` with the one codec pickles use for bytes.

    Python 3 pickles ``bytes`` for protocols 0-2 as ``_codecs.encode(text,
    "latin1")``. Any other codec is refused: codec lookup can import modules.
    """
    codec = str(encoding).lower().replace("_", "-")
    if not isinstance(text, str) or codec not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed")
    return text.encode("latin-1", errors="strict")


# What numpy arrays need on unpickling, in numpy.core (1.x) or numpy._core (2.x):
# _reconstruct for protocols 0-4, _frombuffer for protocol 5, scalar for numpy scalars.
_NUMPY_PICKLE_HELPERS = frozenset(
    {("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")}
)


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds numpy arrays, dtypes and numpy scalars.

    Names are looked up in a fixed table, never imported from the pickle's text,
    so a pickle that names ``os.system``, ``builtins.eval`` or any other callable
    is refused before anything is called.
    """

    def __init__(self, file, path: Path):
        # encoding="bytes" keeps Python 2 strings (the official files) as bytes.
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        package, _, submodule = module.rpartition(".")
        if package in ("numpy.core", "numpy._core") and (submodule, name) in _NUMPY_PICKLE_HELPERS:
            return getattr(_numpy_core_module(submodule), name)
        raise DataError(
            f"{self._path}: the CIFAR-10 reader refuses to load pickled class {module}.{name}; "
            f"use the official files or {_HINT_DATA_DIR}"
        )

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


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
) -> Path:
    """Return the folder that holds the CIFAR-10 files, downloading them if needed.

    Looks, in order, at ``data_dir``, then ``$RESNET_GRAPH_DATA_DIR``, then the
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
        return _resolve_or_raise(Path(data_dir).expanduser(), "")[0]
    env_dir = os.environ.get(ENV_DATA_DIR, "")
    if env_dir:
        return _resolve_or_raise(Path(env_dir).expanduser(), f" (from ${ENV_DATA_DIR})")[0]

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = cache / BIN_FOLDER
    if _first_missing(folder, TRAIN_FILES + (TEST_FILE,)) is None:
        return folder.resolve()
    if not download:
        raise DataError(f"CIFAR-10 is not in {folder} and downloading is off; {_HINT_DATA_DIR}")
    folder = download_cifar10(cache, url=url, md5=md5, progress=progress, allow_insecure=allow_insecure)
    return folder.resolve()


def _layouts(folder: Path) -> list[tuple[Path, tuple[str, ...]]]:
    """Where the files may sit under ``folder``, in order of preference."""
    bin_names = TRAIN_FILES + (TEST_FILE,)
    py_names = PY_TRAIN_FILES + (PY_TEST_FILE,)
    return [(folder, bin_names), (folder / BIN_FOLDER, bin_names), (folder, py_names), (folder / PY_FOLDER, py_names)]


def _first_missing(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if not (folder / name).is_file():
            return folder / name
    return None


def _resolve_layout(folder: Path) -> tuple[Path, str] | None:
    """``(folder with the files, "bin" | "py")`` for the first complete layout, else None."""
    for candidate, names in _layouts(folder):
        if _first_missing(candidate, names) is None:
            return candidate.resolve(), ("bin" if names[0].endswith(".bin") else "py")
    return None


def _resolve_or_raise(folder: Path, source: str) -> tuple[Path, str]:
    """Resolve a folder the user named to ``(folder with the files, format)``, or say what is missing."""
    if not folder.exists():
        raise DataError(f"data folder {folder}{source} does not exist; {_HINT_DATA_DIR}")
    if not folder.is_dir():
        raise DataError(f"data folder {folder}{source} is not a folder; {_HINT_DATA_DIR}")
    found = _resolve_layout(folder)
    if found is not None:
        return found
    # Name a file of the layout closest to complete; on a tie prefer an existing
    # sub-folder (that is where the user put the files), then binary over python.
    existing = [(candidate, names) for candidate, names in _layouts(folder) if candidate.is_dir()]
    candidate, names = max(
        existing, key=lambda layout: (sum((layout[0] / name).is_file() for name in layout[1]), layout[0] != folder)
    )
    raise DataError(f"CIFAR-10 file {_first_missing(candidate, names)} is missing{source}; {_HINT_DATA_DIR}")


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
        raise DataError(f"cannot create the cache folder {cache} ({_reason(error)}); {_HINT_DOWNLOAD}") from error

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
        missing = _first_missing(extracted, TRAIN_FILES + (TEST_FILE,))
        if missing is not None:
            raise DataError(
                f"the archive from {url} lacks {BIN_FOLDER}/{missing.name}: not the CIFAR-10 binary version; "
                f"{_HINT_DOWNLOAD}"
            )
        target = cache / BIN_FOLDER
        previous = workdir / "previous"
        if os.path.lexists(target):
            # os.replace cannot overwrite a non-empty folder: move the old one
            # into the work folder (removed below) first, and back on failure.
            os.replace(target, previous)
        try:
            os.replace(extracted, target)
        except OSError:
            if os.path.lexists(previous) and not os.path.lexists(target):
                os.replace(previous, target)
            raise
        return target
    except DataError:
        raise
    except (OSError, tarfile.TarError, EOFError, zlib.error, http.client.HTTPException, ValueError) as error:
        if isinstance(error, urllib.error.HTTPError):
            error.close()  # it holds the open response
        raise DataError(f"could not download CIFAR-10 from {url} ({_reason(error)}); {_HINT_DOWNLOAD}") from error
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


# --------------------------------------------------------------------------- loading and splitting


def load_cifar10(
    data_dir: str | os.PathLike,
    *,
    valid_size: int = 10000,
    train_examples: int | None = None,
    seed: int = 0,
) -> Cifar10:
    """Read CIFAR-10 from ``data_dir`` and split off a validation set.

    ``data_dir`` is resolved like in :func:`find_data_dir` (the folder with the
    files or its parent); the binary files are preferred over the python ones.

    The split: ``np.random.default_rng(seed).permutation(N)`` of the N training
    images; its first ``valid_size`` entries are the validation set, the rest
    the training set. Both keep the original file order (sorted indices), so
    the split depends only on the seed and ``valid_size``. ``train_examples``
    then keeps the first N of the remaining training images, for quick runs.

    Raises:
        DataError: missing or corrupt files, or sizes out of range.
    """
    valid_size = _as_int("valid size", valid_size)
    if train_examples is not None:
        train_examples = _as_int("train examples", train_examples)
    folder, fmt = _resolve_or_raise(Path(data_dir).expanduser(), "")
    if fmt == "bin":
        reader, train_names, test_name = read_binary_batch, TRAIN_FILES, TEST_FILE
    else:
        reader, train_names, test_name = read_python_batch, PY_TRAIN_FILES, PY_TEST_FILE

    parts = [reader(folder / name) for name in train_names]
    all_images = np.concatenate([part.images for part in parts])
    all_labels = np.concatenate([part.labels for part in parts])
    del parts
    total = len(all_labels)

    if not 0 <= valid_size < total:
        raise DataError(
            f"validation size {valid_size} is out of range for the {total} training images in {folder}; "
            f"pass --valid-size from 0 to {total - 1}"
        )
    permutation = np.random.default_rng(seed).permutation(total)
    valid_index = np.sort(permutation[:valid_size])
    train_index = np.sort(permutation[valid_size:])
    if train_examples is not None:
        remaining = len(train_index)
        if not 1 <= train_examples <= remaining:
            raise DataError(
                f"train examples {train_examples} is out of range: {remaining} training images remain after "
                f"holding out {valid_size} for validation; pass --train-examples from 1 to {remaining}"
            )
        train_index = train_index[:train_examples]

    train = Split(all_images[train_index], all_labels[train_index])
    valid = Split(all_images[valid_index], all_labels[valid_index])
    del all_images, all_labels
    test = reader(folder / test_name)
    mean, std = channel_stats(train.images)
    return Cifar10(train=train, valid=valid, test=test, mean=mean, std=std, data_dir=str(folder))


def channel_stats(images: np.ndarray, *, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population standard deviation of ``[N, H, W, C]`` images.

    For ``uint8`` images this counts a 256-bin histogram per channel, chunk by
    chunk, and takes exact integer moments from it: no float copy of the whole
    array and no cancellation in ``E[x^2] - E[x]^2``. Other dtypes are reduced
    in float64 with two passes, also in chunks of ``chunk`` images.

    Returns:
        ``(mean, std)``, each a tuple of C Python floats in the images' units.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"channel_stats needs a non-empty [N, H, W, C] array, got shape {images.shape}")
    channels = images.shape[-1]
    count = images.shape[0] * images.shape[1] * images.shape[2]
    if images.dtype == np.uint8:
        histograms = np.zeros((channels, 256), dtype=np.int64)
        for start in range(0, images.shape[0], chunk):
            pixels = images[start : start + chunk].reshape(-1, channels)
            for c in range(channels):
                histograms[c] += np.bincount(pixels[:, c], minlength=256)
        values = np.arange(256, dtype=np.int64)
        sums = [int(s) for s in histograms @ values]
        squares = [int(q) for q in histograms @ (values * values)]
        mean = tuple(s / count for s in sums)
        # Var = (n*Q - S^2) / n^2, exact in Python integers until the division.
        std = tuple(math.sqrt((count * q - s * s) / (count * count)) for s, q in zip(sums, squares))
        return mean, std

    sums = np.zeros(channels, dtype=np.float64)
    for start in range(0, images.shape[0], chunk):
        sums += images[start : start + chunk].sum(axis=(0, 1, 2), dtype=np.float64)
    mean_array = sums / count
    deviations = np.zeros(channels, dtype=np.float64)
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].astype(np.float64) - mean_array
        deviations += np.square(block).sum(axis=(0, 1, 2))
    return tuple(float(m) for m in mean_array), tuple(float(math.sqrt(d / count)) for d in deviations)


def pad_crop_flip(images: np.ndarray, rng) -> np.ndarray:
    """Reference augmentation: 4-pixel zero pad, random crop back to size, random flip.

    For each image independently: pad 4 zero pixels on every side, cut a window
    of the original size at a uniformly random offset (0..8 in each direction),
    and mirror it left-right with probability 1/2. This is the standard CIFAR
    augmentation (He et al. 2016); the graph's version is tested against it.

    Random draws, in this order: ``integers(0, 9, N)`` row offsets,
    ``integers(0, 9, N)`` column offsets, ``random(N) < 0.5`` flips.

    Args:
        images: ``[N, H, W, C]`` of any dtype; the output has the same shape and dtype.
        rng: a ``numpy.random.Generator`` (or a seed for one).
    """
    pad = 4
    rng = np.random.default_rng(rng)
    images = np.asarray(images)
    count, height, width = images.shape[:3]
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = rng.integers(0, 2 * pad + 1, size=count)
    cols = rng.integers(0, 2 * pad + 1, size=count)
    flips = rng.random(count) < 0.5
    row_index = rows[:, None] + np.arange(height)
    steps = np.where(flips[:, None], np.arange(width - 1, -1, -1), np.arange(width))
    col_index = cols[:, None] + steps
    return padded[np.arange(count)[:, None, None], row_index[:, :, None], col_index[:, None, :]]


# --------------------------------------------------------------------------- synthetic data


# Well separated colours, one per class, so the class shows in every crop.
_SYNTHETIC_COLOURS = (
    (220, 40, 40),
    (40, 200, 40),
    (40, 40, 220),
    (220, 220, 40),
    (220, 40, 220),
    (40, 220, 220),
    (235, 235, 235),
    (25, 25, 25),
    (128, 128, 128),
    (230, 140, 30),
)


def synthetic_split(n: int, rng, *, learnable: bool = True) -> Split:
    """``n`` synthetic images with balanced labels, drawn from ``rng``.

    With ``learnable`` each class has its own colour and stripe pattern
    (stripes 1, 2, 4, 8 or 16 pixels wide, horizontal for even classes and
    vertical for odd ones) plus uniform noise of +-40, so a tiny network learns
    it in a few steps. Without it, pixels and labels are uniform noise.
    """
    rng = np.random.default_rng(rng)
    if not learnable:
        images = rng.integers(0, 256, size=(n, *IMAGE_SHAPE), dtype=np.uint8)
        return Split(images, rng.integers(0, NUM_CLASSES, size=n).astype(np.int32))
    labels = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int32)
    coords = np.arange(32)
    patterns = np.empty((NUM_CLASSES, 32, 32), dtype=np.int16)
    for c in range(NUM_CLASSES):
        stripes = ((coords // (2 ** (c // 2))) % 2) * 60 - 30
        patterns[c] = stripes[:, None] if c % 2 == 0 else stripes[None, :]
    noise = rng.integers(-40, 41, size=(n, *IMAGE_SHAPE), dtype=np.int16)
    colours = np.array(_SYNTHETIC_COLOURS, dtype=np.int16)
    pixels = colours[labels][:, None, None, :] + patterns[labels][..., None] + noise
    return Split(np.clip(pixels, 0, 255).astype(np.uint8), labels)


def write_synthetic_cifar(
    directory: str | os.PathLike,
    n_train_per_batch: int = 100,
    n_test: int = 100,
    seed: int = 0,
    learnable: bool = True,
) -> Path:
    """Write a small, deterministic CIFAR-10 look-alike for tests.

    Writes ``data_batch_1.bin`` ... ``data_batch_5.bin`` (``n_train_per_batch``
    records each), ``test_batch.bin`` (``n_test``) and ``batches.meta.txt``
    straight into ``directory`` (created if needed), using
    :func:`synthetic_split`. The same arguments always give the same bytes.

    Returns:
        ``directory`` as a Path, ready for :func:`load_cifar10` (pass a
        ``valid_size`` below ``5 * n_train_per_batch``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in TRAIN_FILES:
        split = synthetic_split(n_train_per_batch, rng, learnable=learnable)
        write_binary_batch(directory / name, split.images, split.labels)
    split = synthetic_split(n_test, rng, learnable=learnable)
    write_binary_batch(directory / TEST_FILE, split.images, split.labels)
    (directory / META_FILE).write_text("\n".join(CLASS_NAMES) + "\n\n", encoding="ascii")
    return directory


# --------------------------------------------------------------------------- helpers


def _file_size(path: Path) -> int:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise DataError(f"CIFAR-10 file {path} is missing; {_HINT_DATA_DIR}") from None
    except OSError as error:
        raise DataError(f"cannot read {path} ({_reason(error)}); {_HINT_DATA_DIR}") from error
    if not path.is_file():
        raise DataError(f"{path} is not a file; {_HINT_DATA_DIR}")
    return info.st_size


def _check_labels(path: Path, labels: np.ndarray) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        first = int(bad[0])
        raise DataError(
            f"{path} record {first} has label {int(labels[first])}, not 0-9: "
            f"corrupt or not a CIFAR-10 batch; {_HINT_BAD_FILE}"
        )


def _as_int(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{what} must be a whole number, got {value!r}")
    return int(value)


def _describe_array(value) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


def _reason(error: BaseException) -> str:
    """A short one-line description of an exception for an error message."""
    if isinstance(error, urllib.error.HTTPError):
        text = f"HTTP {error.code} {error.reason}"
    elif isinstance(error, urllib.error.URLError):
        text = str(error.reason)
    elif isinstance(error, OSError) and error.strerror:
        text = error.strerror
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())
