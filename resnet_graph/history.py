"""The training history file: one HDF5 file, one group per run.

Layout (the contract is in docs/cli.md)::

    /<run>                 group, one per run, in creation order
        epoch              int64,   one row per finished epoch (1, 2, 3, ...)
        train_loss         float64
        train_acc          float64, a fraction in [0, 1]
        valid_loss         float64
        valid_acc          float64, a fraction in [0, 1]
        lr                 float64
        seconds            float64
        <extra>            float64, optional extra columns of the same length
        grad_norm          float64 [epochs, layers], optional 2-D per-epoch datasets
                           ("matrices"), with their column names in the
                           dataset's attribute ``labels``
        attrs: config (JSON text), tensorflow_version, device, created,
               and after the final evaluation test_loss, test_acc

Reads of a file from outside (the default, ``guard=True``) first read it in a
forked child with a time limit (:func:`_probe`); the file a run writes is read
with ``guard=False``, without a fork. Every change is copy-on-write: under an exclusive ``flock`` on the sidecar
``<file>.lock`` the whole file is copied into a temporary file in the same
folder, changed there, flushed, fsynced and moved over the original with
``os.replace``; then the folder is fsynced (resnet_graph.fsutil). A kill at any moment or a full
disk therefore leaves either the old or the new file, never a mix. Readers do
not lock: the file they open is never changed in place.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import numbers
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np

from resnet_graph import fsutil, sandbox
from resnet_graph.errors import HistoryError

FIELDS = ("epoch", "train_loss", "train_acc", "valid_loss", "valid_acc", "lr", "seconds")
ACCURACY_FIELDS = ("train_acc", "valid_acc")
# Run attributes of the final evaluation: they describe the end of the run, so a run
# that loses epochs or gains epochs to train loses them.
FINAL_ATTRS = ("test_loss", "test_acc", "best_epoch", "best_valid_acc", "best_test_loss",
               "best_test_acc")

FORMAT_NAME = "resnet-graph-history"
# 1: one 1-D dataset per column; 2: also 2-D per-epoch datasets (``grad_norm``), which
# version 1 readers refuse.
FORMAT_VERSION = 2
LOCK_SUFFIX = ".lock"
LOCK_TIMEOUT_SECONDS = 300.0
MAX_RUN_NAME_LENGTH = 100

_RUN_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\Z")
_CHUNK_ROWS = 64
# h5py reports damaged or foreign files with any of these.
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError)


@dataclass(frozen=True, eq=False)
class Run:
    """One run read from a history file.

    ``columns`` holds every 1-D dataset of the run's group (at least
    ``FIELDS``) as read-only arrays: ``epoch`` is int64, the others float64.
    ``matrices`` holds the 2-D ones (one row per epoch, e.g. ``grad_norm``:
    epochs x layers) as read-only float64 arrays, and ``labels`` the names of
    their columns. ``attrs`` holds the group's attributes as Python values,
    with ``config`` decoded from JSON into a dict (``{}`` when the attribute
    is missing).
    """

    name: str
    columns: dict[str, np.ndarray]
    attrs: dict
    matrices: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        """The number of finished epochs (rows)."""
        return int(len(self.columns["epoch"]))


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def validate_run_name(name) -> str:
    """Return ``name`` if it can name a run, else raise HistoryError.

    A run name is 1 to 100 characters of ASCII letters, digits, '-', '_' and
    '.', and starts with a letter, digit or '_' (so never '.', '..', a path,
    a hidden name or a control character).
    """
    if not isinstance(name, str):
        raise HistoryError(
            f"run name {name!r} is not text: use letters, digits, '-', '_', '.'"
        )
    if not name:
        raise HistoryError("run name is empty: use letters, digits, '-', '_', '.'")
    if len(name) > MAX_RUN_NAME_LENGTH:
        raise HistoryError(
            f"run name {_short(name)!r} has {len(name)} characters, more than "
            f"{MAX_RUN_NAME_LENGTH}: choose a shorter name of letters, digits, '-', '_', '.'"
        )
    if not _RUN_NAME_RE.match(name):
        raise HistoryError(
            f"run name {name!r} is not valid: use letters, digits, '-', '_', '.' "
            "and start with a letter, digit or '_'"
        )
    return name


def create_run(
    path,
    run,
    *,
    config: dict,
    attrs: dict | None = None,
    exist_ok: bool = False,
) -> None:
    """Add run ``run`` with no rows to the history file at ``path``.

    The file (and its folder) is created if needed. ``config`` is stored as
    JSON text in the ``config`` attribute, ``attrs`` as further attributes.
    An existing run is refused unless ``exist_ok``; then its rows are kept
    and its ``config`` and the given ``attrs`` are overwritten.
    """
    name = validate_run_name(run)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, not {type(config).__name__}")
    config_text = _config_json(config)
    extra = _check_attrs(attrs or {})
    if "config" in extra:
        raise TypeError("pass the configuration as config=, not inside attrs")
    path = Path(path)

    def mutate(f: h5py.File) -> None:
        if name in f:
            if not exist_ok:
                raise HistoryError(
                    f"run {name} already exists in {path}; pass --resume to continue "
                    "it or choose another --name"
                )
            group = _run_group(f, name, path)
            _load_group(group, name, path)  # refuse to continue a damaged run
        else:
            group = f.create_group(name, track_order=True)
            for field in FIELDS:
                _write_column(group, field, np.empty(0, dtype=_dtype_of(field)))
            group.attrs["created"] = _utc_now()
        group.attrs["config"] = config_text
        _apply_attrs(group, extra)

    _modify(path, mutate, create=True)


def append_epoch(path, run, row: dict, matrices: dict | None = None) -> None:
    """Append one finished epoch to run ``run``.

    ``row`` holds every name of ``FIELDS`` and optionally further numeric
    values, which become (or extend) extra columns; earlier rows of a new
    extra column, and rows that leave out an existing one, hold NaN. The
    epoch must be the last epoch + 1 (the first epoch is 1); accuracies must
    be fractions in [0, 1]. ``matrices`` maps the name of a 2-D dataset to
    ``(labels, values)``: this epoch's row of it and the names of its columns,
    which must be those the run already has (NaN fills as for columns).
    """
    name = validate_run_name(run)
    values = _check_row(name, row)
    rows = _check_matrices(name, matrices or {}, reserved=values)
    epoch = int(values["epoch"])
    path = Path(path)

    def mutate(f: h5py.File) -> None:
        group = _run_group(f, name, path)
        current = _load_group(group, name, path)
        epochs = current.columns["epoch"]
        last = int(epochs[-1]) if len(epochs) else 0
        if epoch <= last:
            raise HistoryError(
                f"run {name} in {path} already has epoch {epoch} (its last epoch is "
                f"{last}); append epoch {last + 1} next or truncate the run first"
            )
        if epoch != last + 1:
            raise HistoryError(
                f"run {name} in {path}: epoch {epoch} would leave a gap after epoch "
                f"{last}; append epoch {last + 1} next"
            )
        n = len(epochs)
        for key, column in current.columns.items():
            value = values.get(key, math.nan)
            _write_column(group, key, np.append(column, np.asarray(value, column.dtype)))
        for key, value in values.items():
            if key not in current.columns:
                filled = np.full(n + 1, math.nan, dtype=np.float64)
                filled[-1] = value
                _write_column(group, key, filled)
        for key, matrix in current.matrices.items():
            labels, row_values = rows.get(key, (current.labels[key], None))
            if tuple(labels) != current.labels[key]:
                raise HistoryError(
                    f"run {name} in {path}: the columns of {key} differ from the earlier "
                    f"epochs' ({len(labels)} vs {len(current.labels[key])} names); the run's "
                    "model changed, use another --name"
                )
            new_row = np.full((1, len(labels)), math.nan) if row_values is None \
                else row_values[None, :]
            _write_matrix(group, key, np.concatenate([matrix, new_row]), labels)
        for key, (labels, row_values) in rows.items():
            if key not in current.matrices:
                filled = np.full((n + 1, len(labels)), math.nan, dtype=np.float64)
                filled[-1] = row_values
                _write_matrix(group, key, filled, labels)

    _modify(path, mutate, create=False)


def set_attrs(path, run, **attrs) -> None:
    """Set attributes of run ``run``, e.g. ``test_loss=..., test_acc=...``.

    Values are text, numbers, booleans or lists of numbers; ``config`` takes
    a dict (stored as JSON); ``None`` removes the attribute. ``test_acc`` must
    be a fraction in [0, 1].
    """
    name = validate_run_name(run)
    values = _check_attrs(attrs)
    if "config" in values:
        if not isinstance(values["config"], dict):
            raise TypeError("config must be a dict")
        values["config"] = _config_json(values["config"])
    path = Path(path)

    def mutate(f: h5py.File) -> None:
        group = _run_group(f, name, path)
        _load_group(group, name, path)
        _apply_attrs(group, values)

    _modify(path, mutate, create=False)


def truncate(path, run, last_epoch: int) -> None:
    """Drop the rows of run ``run`` whose epoch is greater than ``last_epoch``.

    Used when resuming from a checkpoint older than the history. When rows
    are dropped, the final evaluation's attributes (``FINAL_ATTRS``: ``test_acc``,
    ``best_test_acc``, ...) are removed too, because they described the dropped
    end of the run. Nothing changes when no row is newer than ``last_epoch``.
    """
    name = validate_run_name(run)
    if isinstance(last_epoch, bool) or not isinstance(last_epoch, numbers.Integral):
        raise TypeError(f"last_epoch must be an integer, not {last_epoch!r}")
    last_epoch = int(last_epoch)
    if last_epoch < 0:
        raise HistoryError(f"cannot truncate run {name} to epoch {last_epoch}: use 0 or more")
    path = Path(path)

    def mutate(f: h5py.File):
        group = _run_group(f, name, path)
        current = _load_group(group, name, path)
        keep = current.columns["epoch"] <= last_epoch
        if keep.all():
            return _UNCHANGED
        for key, column in current.columns.items():
            _write_column(group, key, column[keep])
        for key, matrix in current.matrices.items():
            _write_matrix(group, key, matrix[keep], current.labels[key])
        for key in FINAL_ATTRS:
            if key in group.attrs:
                del group.attrs[key]
        return None

    _modify(path, mutate, create=False)


def remove_run(path, run) -> None:
    """Delete run ``run`` and its rows from the history file (atomically, like every change)."""
    name = validate_run_name(run)
    path = Path(path)

    def mutate(f: h5py.File) -> None:
        _run_group(f, name, path)
        del f[name]

    _modify(path, mutate, create=False)


def read_run(path, run, *, guard: bool = True) -> Run:
    """Read one run; HistoryError if the file or the run is missing or damaged."""
    return read_history(path, [run], guard=guard)[0]


def read_history(path, runs: list[str] | None = None, *, guard: bool = True) -> list[Run]:
    """Read all runs in file order (creation order), or the named ones in the given order.
    A file without runs that is not a history (another program's HDF5 data, a newer
    format) is a HistoryError, as for writing.

    ``guard``: first read the file in a forked child with a time limit
    (:func:`_probe`), for files that come from outside; pass False for a file
    this process writes itself (a fork in a multi-threaded process can block).
    """
    path = Path(path)
    wanted = None
    if runs is not None:
        if isinstance(runs, str):
            runs = [runs]
        wanted = list(dict.fromkeys(validate_run_name(r) for r in runs))
    with _open_for_reading(path, guard) as f:
        try:
            names = _group_names(f)
            if not names:
                _check_is_history(f, path)   # no runs: a new history, or another program's file
            if wanted is not None:
                unknown = [r for r in wanted if r not in names]
                if unknown:
                    available = ", ".join(names) if names else "none, the file has no runs"
                    raise HistoryError(
                        f"run {', '.join(unknown)} not in {path}; available runs: {available}"
                    )
                names = wanted
            return [_load_group(f[n], n, path) for n in names]
        except HistoryError:
            raise
        except _H5_ERRORS as exc:
            raise _damaged(path, exc) from exc


def run_names(path, *, guard: bool = True) -> list[str]:
    """The names of the runs in the file, in file order (creation order); ``guard``
    as in :func:`read_history`."""
    path = Path(path)
    with _open_for_reading(path, guard) as f:
        try:
            return _group_names(f)
        except _H5_ERRORS as exc:
            raise _damaged(path, exc) from exc


def check_writable(path) -> None:
    """HistoryError unless ``path`` is absent or a history this version can add runs to
    (not another program's HDF5 file, not a newer format): to ask before a run starts."""
    path = Path(path)
    if not path.exists():
        return
    with _open_for_reading(path, guard=False) as f:
        try:
            _check_is_history(f, path)
        except _H5_ERRORS as exc:
            raise _damaged(path, exc) from exc


def has_run(path, run, *, guard: bool = True) -> bool:
    """Whether the file holds run ``run``; False when the file does not exist."""
    name = validate_run_name(run)
    path = Path(path)
    if not path.exists():
        return False
    return name in run_names(path, guard=guard)


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _open_for_reading(path: Path, guard: bool) -> Iterator[h5py.File]:
    if not path.exists():
        raise HistoryError(
            f"history file {path} does not exist; check the path or train a run first"
        )
    if path.is_dir():
        raise HistoryError(f"{path} is a folder, not an HDF5 history file")
    if guard:
        _probe(path)
    try:
        f = h5py.File(path, "r", locking=False)
    except PermissionError as exc:
        raise HistoryError(f"cannot read {path}: permission denied") from exc
    except _H5_ERRORS as exc:
        raise HistoryError(f"{path} is not an HDF5 history file") from exc
    try:
        yield f
    finally:
        with contextlib.suppress(*_H5_ERRORS):
            f.close()


# Files that a child process has read completely, by (path, inode, size, mtime).
_PROBED: dict[tuple, bool] = {}
PROBE_SECONDS = 20.0   # plus one second per MiB


def _probe(path: Path) -> None:
    """Read the whole file once in a forked child before this process touches it.

    Only for files from outside (``plot``, ``experiment`` on an existing
    folder): the file a run writes was written by this code, and a fork of a
    process whose other threads hold locks (TensorFlow's) can leave the child
    blocked until the time limit, which would refuse a good file.

    Some damaged HDF5 files send libhdf5 into an endless loop (a corrupted global
    heap under a string attribute was found by the fuzz test) or crash it; C code
    cannot be interrupted from Python, so a child takes that risk: if it does not
    finish in time or dies of a signal, the file is reported as damaged and this
    process never reads it. A child that raises an ordinary error exits normally,
    and the read below reports that error as usual.
    """
    try:
        st = path.stat()
    except OSError:
        return
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _PROBED or not sandbox.available():
        return
    limit = PROBE_SECONDS + st.st_size / (1 << 20)

    def read_everything():
        with h5py.File(path, "r", locking=False) as f:
            for name in _group_names(f):
                _load_group(f[name], name, path)

    try:
        sandbox.run_in_child(read_everything, limit)
    except sandbox.Hung:
        raise HistoryError(f"{path} is damaged: reading it did not finish in {limit:.0f} s") from None
    except sandbox.Crashed as crash:
        raise HistoryError(f"{path} is damaged: reading it crashed HDF5 "
                           f"(signal {crash.args[0]})") from None
    _PROBED[key] = True


def _group_names(f: h5py.Group) -> list[str]:
    names = []
    for key in f.keys():
        link = f.get(key, getlink=True)
        if isinstance(link, h5py.HardLink) and isinstance(f[key], h5py.Group):
            names.append(key)
    return names


def _load_group(group: h5py.Group, name: str, path: Path) -> Run:
    """Read and check one run group; HistoryError names the run and the problem."""
    where = f"run {name} in {path}"
    columns: dict[str, np.ndarray] = {}
    matrices: dict[str, np.ndarray] = {}
    labels: dict[str, tuple[str, ...]] = {}
    for key in group.keys():
        link = group.get(key, getlink=True)
        if not isinstance(link, h5py.HardLink):
            continue
        obj = group[key]
        if not isinstance(obj, h5py.Dataset):
            continue
        if obj.ndim == 2 and key not in FIELDS:
            matrices[key], labels[key] = _load_matrix(obj, key, where)
            continue
        if obj.ndim != 1:
            raise HistoryError(
                f"{where}: dataset {key} has shape {obj.shape}, not one row per epoch; "
                "the file is damaged or not a history file"
            )
        if obj.dtype.kind not in "biuf":
            raise HistoryError(
                f"{where}: dataset {key} is not numeric ({obj.dtype}); "
                "the file is damaged or not a history file"
            )
        data = np.asarray(obj[()])
        if key == "epoch":
            if data.dtype.kind == "f" and not (
                np.all(np.isfinite(data)) and np.all(data == np.round(data))
            ):
                raise HistoryError(
                    f"{where}: dataset epoch holds non-integer values; the file is damaged"
                )
            data = data.astype(np.int64)
        else:
            data = data.astype(np.float64)
        data.setflags(write=False)
        columns[key] = data
    missing = [field for field in FIELDS if field not in columns]
    if missing:
        raise HistoryError(
            f"{where} lacks dataset {', '.join(missing)}; the file is damaged or not a "
            "history file"
        )
    lengths = {key: len(column) for key, column in columns.items()}
    lengths.update({key: len(matrix) for key, matrix in matrices.items()})
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{key} {n}" for key, n in lengths.items())
        raise HistoryError(
            f"{where} has datasets of unequal length ({detail}); the file is damaged, "
            "delete the run or use another file"
        )
    return Run(name=name, columns=columns, attrs=_read_attrs(group, where),
               matrices=matrices, labels=labels)


def _load_matrix(obj: h5py.Dataset, key: str, where: str) -> tuple:
    """A 2-D per-epoch dataset and its column names (attribute ``labels``)."""
    if obj.dtype.kind not in "biuf":
        raise HistoryError(f"{where}: dataset {key} is not numeric ({obj.dtype}); "
                           "the file is damaged or not a history file")
    names = None
    if "labels" in obj.attrs:
        _check_attr(obj, "labels", where)
        names = _python_value(obj.attrs["labels"])
    if not isinstance(names, list) or len(names) != obj.shape[1] or not all(
            isinstance(n, str) for n in names):
        raise HistoryError(f"{where}: dataset {key} lacks one name per column (attribute "
                           "labels); the file is damaged")
    data = np.asarray(obj[()], dtype=np.float64)
    data.setflags(write=False)
    return data, tuple(names)


# What a history attribute may be: text, numbers, booleans (h5py's enum), at most
# this many values. Anything else is a damaged file, refused before HDF5 reads the
# value (an opaque type made by a flipped bit once sent h5py into an endless read).
_ATTR_TYPES = (h5py.h5t.TypeStringID, h5py.h5t.TypeIntegerID, h5py.h5t.TypeFloatID,
               h5py.h5t.TypeEnumID)
_ATTR_MAX_VALUES = 1 << 16


def _check_attr(group: h5py.Group, key: str, where: str) -> None:
    attr = h5py.h5a.open(group.id, key.encode("utf-8"))
    try:
        kind = attr.get_type()
        size = int(np.prod(attr.shape, dtype=np.int64)) if attr.shape else 1
    finally:
        attr.close()
    if not isinstance(kind, _ATTR_TYPES) or size > _ATTR_MAX_VALUES:
        raise HistoryError(f"{where}: attribute {key} has an unexpected type or size; "
                           "the file is damaged")


def _read_attrs(group: h5py.Group, where: str) -> dict:
    attrs: dict[str, Any] = {}
    for key in group.attrs.keys():
        _check_attr(group, key, where)
        attrs[key] = _python_value(group.attrs[key])
    if "config" in attrs:
        text = attrs["config"]
        try:
            config = json.loads(text) if isinstance(text, str) else None
        except ValueError:
            config = None
        if not isinstance(config, dict):
            raise HistoryError(
                f"{where}: attribute config is not a JSON object; the file is damaged"
            )
        attrs["config"] = config
    else:
        attrs["config"] = {}
    return attrs


def _python_value(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "SO":
            return [_python_value(v) for v in value.tolist()]
        value = value.copy()
        value.setflags(write=False)
        return value
    if isinstance(value, np.generic):
        return _python_value(value.item())
    return value


def _damaged(path: Path, exc: BaseException) -> HistoryError:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return HistoryError(
        f"{path} is not a readable HDF5 history file ({reason[:200]}); "
        "it may be damaged, use another file"
    )


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------

_UNCHANGED = "unchanged"  # returned by a mutation that changed nothing


def _modify(path: Path, mutate: Callable[[h5py.File], Any], *, create: bool) -> None:
    """Copy the file into a temp file, let ``mutate`` change the copy, replace.

    The original is never opened for writing; on any failure the temp file is
    removed and the original is left as it was (fsutil.replacing).
    """
    folder = path.parent
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HistoryError(
                f"cannot create folder {folder} for the history file: "
                f"{exc.strerror or exc}; choose another path"
            ) from exc
    if path.is_dir():
        raise HistoryError(f"{path} is a folder, not an HDF5 history file")
    with _exclusive_lock(path):
        fsutil.remove_stale_temps(path)
        exists = path.exists()
        if not exists and not create:
            raise HistoryError(
                f"history file {path} does not exist; check the path or create the run first"
            )
        mode = None
        if exists:
            with contextlib.suppress(OSError):
                mode = stat.S_IMODE(os.stat(path).st_mode)
        try:
            with fsutil.replacing(path, mode=mode) as tmp:
                _write_copy(path, tmp, exists, mutate)
        except _Unchanged:
            return
        except HistoryError:
            raise
        except OSError as exc:
            reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
            raise HistoryError(
                f"could not write {path}: {reason}; the file is unchanged, free disk "
                "space or check permissions and try again"
            ) from exc


def _write_copy(path: Path, tmp: Path, exists: bool, mutate) -> None:
    """The new file in ``tmp``: a copy of ``path`` (if it ``exists``), changed by ``mutate``."""
    with h5py.File(tmp, "w", track_order=True, locking=False) as dst:
        if exists:
            with _open_for_reading(path, guard=False) as src:
                try:
                    _check_is_history(src, path)
                    _copy_contents(src, dst)
                except _H5_ERRORS as exc:
                    reason = " ".join(str(exc).split()) or type(exc).__name__
                    raise HistoryError(
                        f"could not copy {path} into a temporary file "
                        f"({reason[:200]}); the file is unchanged: it may be "
                        "damaged, or the disk may be full"
                    ) from exc
        dst.attrs["format"] = FORMAT_NAME
        dst.attrs["format_version"] = FORMAT_VERSION
        if mutate(dst) is _UNCHANGED:
            raise _Unchanged
        dst.flush()


def _check_is_history(f: h5py.File, path: Path) -> None:
    """Refuse to write runs into an HDF5 file that is not a history (another program's
    data, or a newer format): the copy-and-replace would change a file nobody asked to."""
    fmt = None
    if "format" in f.attrs:
        _check_attr(f, "format", str(path))
        fmt = _python_value(f.attrs["format"])
    if fmt is None:
        # Not written by resnet-graph (which always sets format): accepted only if its
        # top level holds run groups and nothing else, e.g. a history rebuilt by hand.
        for key in f.keys():
            link = f.get(key, getlink=True)
            if not (isinstance(link, h5py.HardLink) and isinstance(f[key], h5py.Group)
                    and "epoch" in f[key]):
                raise HistoryError(f"{path} is an HDF5 file but not a resnet-graph history "
                                   f"({key!r} is not a run); choose another history file")
    elif fmt != FORMAT_NAME:
        raise HistoryError(f"{path} is not a resnet-graph history (its format is {fmt!r}); "
                           "choose another history file")
    elif "format_version" in f.attrs:
        _check_attr(f, "format_version", str(path))
        version = _python_value(f.attrs["format_version"])
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise HistoryError(f"{path} is history format version {version}, newer than this "
                               f"resnet-graph writes ({FORMAT_VERSION}); upgrade resnet-graph")


class _Unchanged(Exception):
    """Internal: the mutation changed nothing, so the original stays."""


def _copy_contents(src: h5py.File, dst: h5py.File) -> None:
    for key in src.attrs.keys():
        dst.attrs[key] = src.attrs[key]
    for key in src.keys():
        src.copy(src[key], dst, name=key)


def _run_group(f: h5py.File, name: str, path: Path) -> h5py.Group:
    if name not in f:
        names = _group_names(f)
        available = ", ".join(names) if names else "none, the file has no runs"
        raise HistoryError(f"run {name} not in {path}; available runs: {available}")
    group = f[name]
    if not isinstance(group, h5py.Group):
        raise HistoryError(f"{path} holds {name} but it is not a run group; use another name")
    return group


def _dtype_of(column: str):
    return np.int64 if column == "epoch" else np.float64


def _write_column(group: h5py.Group, key: str, values: np.ndarray) -> None:
    """Store ``values`` as the 1-D dataset ``key``, resizing it in place if possible."""
    values = np.asarray(values, dtype=_dtype_of(key))
    if key in group:
        ds = group[key]
        if (
            isinstance(ds, h5py.Dataset)
            and ds.dtype == values.dtype
            and ds.maxshape == (None,)
        ):
            ds.resize(values.shape)
            if len(values):
                ds[...] = values
            return
        saved = {k: ds.attrs[k] for k in ds.attrs.keys()}
        del group[key]
    else:
        saved = {}
    ds = group.create_dataset(
        key, data=values, maxshape=(None,), chunks=(_CHUNK_ROWS,)
    )
    for k, v in saved.items():
        ds.attrs[k] = v


def _write_matrix(group: h5py.Group, key: str, values: np.ndarray, labels) -> None:
    """Store ``values`` (epochs x len(labels)) as the 2-D dataset ``key``."""
    values = np.asarray(values, dtype=np.float64).reshape(-1, len(labels))
    if key in group:
        ds = group[key]
        if isinstance(ds, h5py.Dataset) and ds.maxshape == (None, len(labels)):
            ds.resize(values.shape)
            if len(values):
                ds[...] = values
            return
        del group[key]
    ds = group.create_dataset(key, data=values, maxshape=(None, len(labels)),
                              chunks=(_CHUNK_ROWS, max(len(labels), 1)))
    ds.attrs["labels"] = list(labels)


def _check_matrices(name: str, matrices: dict, reserved: dict) -> dict:
    """``{key: (labels, values)}`` checked: text names, one finite-or-NaN number each."""
    if not isinstance(matrices, dict):
        raise TypeError(f"matrices must be a dict, not {type(matrices).__name__}")
    checked = {}
    for key, pair in matrices.items():
        if not isinstance(key, str) or not key or "/" in key or key in reserved \
                or key in FIELDS or key in (".", ".."):
            raise HistoryError(f"matrix name {key!r} for run {name} is not valid")
        labels, values = pair
        labels = tuple(labels)
        if not labels or not all(isinstance(x, str) and x for x in labels):
            raise HistoryError(f"{key} of run {name} needs one non-empty name per column")
        try:
            values = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise HistoryError(f"{key} of run {name} is not a row of numbers") from None
        if values.shape != (len(labels),):
            raise HistoryError(f"{key} of run {name} has shape {values.shape}, not one value "
                               f"for each of its {len(labels)} names")
        checked[key] = (labels, values)
    return checked


def _apply_attrs(group: h5py.Group, values: dict) -> None:
    for key, value in values.items():
        if value is None:
            if key in group.attrs:
                del group.attrs[key]
        else:
            group.attrs[key] = value


def _check_attrs(attrs: dict) -> dict:
    checked = {}
    for key, value in attrs.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise TypeError(f"attribute name {key!r} must be non-empty text without '/'")
        if key == "config" or value is None or isinstance(value, str):
            checked[key] = value
        elif isinstance(value, (bool, np.bool_)):
            checked[key] = bool(value)
        elif isinstance(value, (numbers.Integral, numbers.Real)):
            checked[key] = value.item() if isinstance(value, np.generic) else value
        elif isinstance(value, (list, tuple, np.ndarray)):
            array = np.asarray(value)
            if array.dtype.kind not in "biuf":
                raise TypeError(f"attribute {key} must hold numbers, not {array.dtype}")
            checked[key] = array
        else:
            raise TypeError(
                f"attribute {key} must be text, a number or a list of numbers, "
                f"not {type(value).__name__}"
            )
    for key in ("test_acc",):
        value = checked.get(key)
        if value is not None and not _is_fraction(value):
            raise HistoryError(
                f"{key} {value!r} is not a fraction in [0, 1]; store accuracies as "
                "fractions, not percentages"
            )
    return checked


def _check_row(name: str, row: dict) -> dict[str, float | int]:
    if not isinstance(row, dict):
        raise TypeError(f"row must be a dict, not {type(row).__name__}")
    missing = [field for field in FIELDS if field not in row]
    if missing:
        raise HistoryError(
            f"the row for run {name} lacks {', '.join(missing)}; every epoch needs "
            f"{', '.join(FIELDS)}"
        )
    values: dict[str, float | int] = {}
    epoch = row["epoch"]
    if (
        isinstance(epoch, (bool, np.bool_))
        or not isinstance(epoch, numbers.Real)
        or not math.isfinite(float(epoch))
        or float(epoch) != int(epoch)
    ):
        raise HistoryError(f"epoch {epoch!r} of run {name} is not a whole number")
    if int(epoch) < 1:
        raise HistoryError(f"epoch {int(epoch)} of run {name} is not valid: epochs start at 1")
    values["epoch"] = int(epoch)
    for key, value in row.items():
        if key == "epoch":
            continue
        if not isinstance(key, str) or not key or "/" in key or key in (".", "..") or any(
            ord(c) < 32 for c in key
        ):
            raise HistoryError(
                f"column name {key!r} for run {name} is not valid: use text without '/'"
            )
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise HistoryError(f"{key} {value!r} of run {name} is not a number")
        values[key] = float(value)
    for key in ACCURACY_FIELDS:
        # NaN means "not measured" (e.g. valid_acc of a run with --valid-size 0).
        if not (math.isnan(values[key]) or _is_fraction(values[key])):
            raise HistoryError(
                f"{key} {values[key]!r} of run {name} is not a fraction in [0, 1]; "
                "store accuracies as fractions, not percentages"
            )
    return values


def _is_fraction(value) -> bool:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and 0.0 <= number <= 1.0


def _config_json(config: dict) -> str:
    def default(obj):
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, os.PathLike):
            return os.fspath(obj)
        if isinstance(obj, (set, frozenset)):
            return sorted(obj)
        raise TypeError(f"config value {obj!r} of type {type(obj).__name__} is not JSON")

    return json.dumps(config, default=default)


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _short(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------
# Files, locks and durability
# --------------------------------------------------------------------------


def lock_path(path) -> Path:
    """The sidecar lock file of the history file ``path``."""
    path = Path(path)
    return path.with_name(path.name + LOCK_SUFFIX)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold ``flock(LOCK_EX)`` on ``<path>.lock``; released by close or by death."""
    lock = lock_path(path)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(fsutil.exclusive_lock(lock, timeout=LOCK_TIMEOUT_SECONDS))
        except fsutil.LockBusy:
            raise HistoryError(
                f"another process has held {lock} for {LOCK_TIMEOUT_SECONDS:.0f} s; "
                "wait for it to finish and try again"
            ) from None
        except OSError as exc:
            raise HistoryError(
                f"cannot open lock file {lock}: {exc.strerror or exc}; "
                "check the folder's permissions"
            ) from exc
        yield
