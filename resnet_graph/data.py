"""CIFAR-10 on disk: the file formats, the layouts of a folder, the split and the
normalisation statistics (finding and downloading the files: resnet_graph.fetch).

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

import importlib
import io
import math
import os
import pickle
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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

BIN_FOLDER = "cifar-10-batches-bin"  # the folder inside the official binary archive
PY_FOLDER = "cifar-10-batches-py"  # the folder inside the official python archive
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
META_FILE = "batches.meta.txt"
PY_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
PY_TEST_FILE = "test_batch"

RECORD_BYTES = 1 + 32 * 32 * 3  # one label byte, then the CHW pixels
MAX_RECORDS = 60000  # the whole data set; a bigger file is not a CIFAR-10 batch

HINT_DATA_DIR = "pass --data-dir PATH to a folder with the CIFAR-10 binary files"
_HINT_BAD_FILE = "replace the file with an official copy or " + HINT_DATA_DIR


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
        raise DataError(f"cannot read {path} ({reason(error)}); {HINT_DATA_DIR}") from error
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
        raise DataError(f"cannot read {path} ({reason(error)}); {HINT_DATA_DIR}") from error
    try:
        batch = _RestrictedUnpickler(io.BytesIO(payload), path).load()
    except DataError:
        raise
    except Exception as error:  # a malformed pickle can raise almost anything
        raise DataError(
            f"{path} is not a readable CIFAR-10 python batch ({reason(error)}); {_HINT_BAD_FILE}"
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
            f"use the official files or {HINT_DATA_DIR}"
        )

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


# --------------------------------------------------------------------------- layouts of a folder


def _layouts(folder: Path) -> list[tuple[Path, tuple[str, ...]]]:
    """Where the files may sit under ``folder``, in order of preference."""
    bin_names = TRAIN_FILES + (TEST_FILE,)
    py_names = PY_TRAIN_FILES + (PY_TEST_FILE,)
    return [(folder, bin_names), (folder / BIN_FOLDER, bin_names), (folder, py_names), (folder / PY_FOLDER, py_names)]


def first_missing(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if not (folder / name).is_file():
            return folder / name
    return None


def _resolve_layout(folder: Path) -> tuple[Path, str] | None:
    """``(folder with the files, "bin" | "py")`` for the first complete layout, else None."""
    for candidate, names in _layouts(folder):
        if first_missing(candidate, names) is None:
            return candidate.resolve(), ("bin" if names[0].endswith(".bin") else "py")
    return None


def resolve_folder(folder: Path, source: str) -> tuple[Path, str]:
    """Resolve a folder the user named to ``(folder with the files, format)``, or say what is missing."""
    if not folder.exists():
        raise DataError(f"data folder {folder}{source} does not exist; {HINT_DATA_DIR}")
    if not folder.is_dir():
        raise DataError(f"data folder {folder}{source} is not a folder; {HINT_DATA_DIR}")
    found = _resolve_layout(folder)
    if found is not None:
        return found
    # Name a file of the layout closest to complete; on a tie prefer an existing
    # sub-folder (that is where the user put the files), then binary over python.
    existing = [(candidate, names) for candidate, names in _layouts(folder) if candidate.is_dir()]
    candidate, names = max(
        existing, key=lambda layout: (sum((layout[0] / name).is_file() for name in layout[1]), layout[0] != folder)
    )
    raise DataError(f"CIFAR-10 file {first_missing(candidate, names)} is missing{source}; {HINT_DATA_DIR}")


# --------------------------------------------------------------------------- loading and splitting


def load_cifar10(
    data_dir: str | os.PathLike,
    *,
    valid_size: int = 10000,
    train_examples: int | None = None,
    seed: int = 0,
) -> Cifar10:
    """Read CIFAR-10 from ``data_dir`` and split off a validation set.

    ``data_dir`` is resolved like in ``fetch.find_data_dir`` (the folder with the
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
    folder, fmt = resolve_folder(Path(data_dir).expanduser(), "")
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


# --------------------------------------------------------------------------- helpers


def _file_size(path: Path) -> int:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise DataError(f"CIFAR-10 file {path} is missing; {HINT_DATA_DIR}") from None
    except OSError as error:
        raise DataError(f"cannot read {path} ({reason(error)}); {HINT_DATA_DIR}") from error
    if not path.is_file():
        raise DataError(f"{path} is not a file; {HINT_DATA_DIR}")
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


def reason(error: BaseException) -> str:
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
