"""Tests for resnet_graph.data: formats, splits, statistics, augmentation, finding and downloading.

Everything runs on small synthetic files under tmp_path; the only network use is
a local HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import http.server
import io
import os
import pickle
import socket
import struct
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import synthetic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resnet_graph import data, fetch
from resnet_graph.errors import DataError, UserError

ALL_BIN = data.TRAIN_FILES + (data.TEST_FILE,)


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """Never read the developer's data folder or cache: point env and cache at tmp_path."""
    monkeypatch.delenv(fetch.ENV_DATA_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def synthetic_dir(tmp_path):
    return synthetic.write_synthetic_cifar(tmp_path / "synthetic", n_train_per_batch=40, n_test=30)


def assert_one_line(excinfo):
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def random_split(n, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.int32)
    return images, labels


def write_indexed_cifar(folder: Path, per_batch=(30, 25, 30, 20, 15), n_test=12) -> int:
    """Binary files whose images carry their global index in pixel (0, 0, 0:2)."""
    start = 0
    for name, count in zip(data.TRAIN_FILES, per_batch):
        images = np.zeros((count, 32, 32, 3), dtype=np.uint8)
        index = np.arange(start, start + count)
        images[:, 0, 0, 0] = index % 256
        images[:, 0, 0, 1] = index // 256
        data.write_binary_batch(folder / name, images, index % 10)
        start += count
    images, labels = random_split(n_test, seed=99)
    data.write_binary_batch(folder / data.TEST_FILE, images, labels)
    return start


def indices_of(split: data.Split) -> np.ndarray:
    return split.images[:, 0, 0, 0].astype(np.int64) + 256 * split.images[:, 0, 0, 1].astype(np.int64)


def python_batch_bytes(images, labels, protocol=4, str_keys=False):
    chw = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)
    keys = ("data", "labels", "batch_label") if str_keys else (b"data", b"labels", b"batch_label")
    batch = {keys[0]: chw, keys[1]: [int(v) for v in labels], keys[2]: b"training batch 1 of 5"}
    return pickle.dumps(batch, protocol=protocol)


def make_tar_gz(path: Path, members) -> bytes:
    """Write a tar.gz from (name, kind, payload) triples; return its bytes."""
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, payload
                tar.addfile(info)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, payload
                tar.addfile(info)
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
    return path.read_bytes()


def cifar_members(source: Path, folder=data.BIN_FOLDER):
    members = [(folder, "dir", None)]
    for name in ALL_BIN + (data.META_FILE,):
        members.append((f"{folder}/{name}", "file", (source / name).read_bytes()))
    return members


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files; ``/redirect?TARGET`` answers 302 to TARGET."""

    def do_GET(self):
        if self.path.startswith("/redirect?"):
            self.send_response(302)
            self.send_header("Location", self.path.split("?", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args):
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that stops reading early (a refused download) is expected here.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def http_root(tmp_path):
    """A folder served over HTTP on 127.0.0.1; yields (root folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def served_archive(http_root, synthetic_dir):
    """A good synthetic cifar-10-binary.tar.gz on the local server: (url, md5, size)."""
    root, base = http_root
    payload = make_tar_gz(root / "cifar-10-binary.tar.gz", cifar_members(synthetic_dir))
    return f"{base}/cifar-10-binary.tar.gz", hashlib.md5(payload).hexdigest(), len(payload)


def serve_tar(http_root, name, members):
    root, base = http_root
    payload = make_tar_gz(root / name, members)
    return f"{base}/{name}", hashlib.md5(payload).hexdigest()


# --------------------------------------------------------------------------- binary format


def test_binary_round_trip(tmp_path):
    images, labels = random_split(7)
    path = tmp_path / "batch.bin"
    data.write_binary_batch(path, images, labels)
    assert path.stat().st_size == 7 * data.RECORD_BYTES
    split = data.read_binary_batch(path)
    assert split.images.dtype == np.uint8 and split.images.shape == (7, 32, 32, 3)
    assert split.labels.dtype == np.int32
    assert len(split) == 7
    np.testing.assert_array_equal(split.images, images)
    np.testing.assert_array_equal(split.labels, labels)
    assert not list(tmp_path.glob(".*.part"))  # the atomic write left no temp file


def test_binary_layout_is_label_then_red_green_blue_planes(tmp_path):
    record = np.zeros(data.RECORD_BYTES, dtype=np.uint8)
    record[0] = 7
    record[1 + 0 * 1024 + 0 * 32 + 5] = 11  # red, row 0, column 5
    record[1 + 1 * 1024 + 3 * 32 + 2] = 22  # green, row 3, column 2
    record[1 + 2 * 1024 + 31 * 32 + 31] = 33  # blue, row 31, column 31
    path = tmp_path / "one.bin"
    path.write_bytes(record.tobytes())
    split = data.read_binary_batch(path)
    assert split.labels.tolist() == [7]
    assert split.images[0, 0, 5, 0] == 11
    assert split.images[0, 3, 2, 1] == 22
    assert split.images[0, 31, 31, 2] == 33
    assert int(split.images.sum()) == 66


def test_binary_missing_file(tmp_path):
    with pytest.raises(DataError, match="missing") as excinfo:
        data.read_binary_batch(tmp_path / "nope.bin")
    assert "nope.bin" in assert_one_line(excinfo)


def test_binary_empty_file(tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty") as excinfo:
        data.read_binary_batch(path)
    assert "empty.bin" in assert_one_line(excinfo)


def test_binary_truncated_file(tmp_path):
    images, labels = random_split(2)
    path = tmp_path / "cut.bin"
    data.write_binary_batch(path, images, labels)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError, match="truncated or not a CIFAR-10 binary batch") as excinfo:
        data.read_binary_batch(path)
    assert "cut.bin" in assert_one_line(excinfo)


def test_binary_label_above_nine(tmp_path):
    images, labels = random_split(3)
    path = tmp_path / "bad.bin"
    data.write_binary_batch(path, images, labels)
    raw = bytearray(path.read_bytes())
    raw[2 * data.RECORD_BYTES] = 10  # the label byte of record 2
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="record 2 has label 10") as excinfo:
        data.read_binary_batch(path)
    assert "bad.bin" in assert_one_line(excinfo)


def test_binary_oversized_sparse_file_is_refused_without_reading(tmp_path):
    path = tmp_path / "huge.bin"
    with open(path, "wb") as out:  # sparse: no disk space, no reading needed
        out.truncate((data.MAX_RECORDS + 1) * data.RECORD_BYTES)
    with pytest.raises(DataError, match="oversized") as excinfo:
        data.read_binary_batch(path)
    assert "huge.bin" in assert_one_line(excinfo)


def test_binary_record_limit_is_enforced(tmp_path, monkeypatch):
    images, labels = random_split(3)
    path = tmp_path / "three.bin"
    data.write_binary_batch(path, images, labels)
    monkeypatch.setattr(data, "MAX_RECORDS", 2)
    with pytest.raises(DataError, match="oversized"):
        data.read_binary_batch(path)


def test_write_binary_batch_rejects_bad_input(tmp_path):
    images, labels = random_split(2)
    with pytest.raises(ValueError):
        data.write_binary_batch(tmp_path / "x.bin", images.astype(np.float32), labels)
    with pytest.raises(ValueError):
        data.write_binary_batch(tmp_path / "x.bin", images, [0, 10])
    with pytest.raises(ValueError):
        data.write_binary_batch(tmp_path / "x.bin", images, [0])
    assert not (tmp_path / "x.bin").exists()


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "fuzz.bin"


@st.composite
def batch_like_bytes(draw):
    if draw(st.booleans()):
        return draw(st.binary(max_size=3 * data.RECORD_BYTES + 5))
    count = draw(st.integers(1, 3))
    labels = draw(st.lists(st.integers(0, 255), min_size=count, max_size=count))
    pixels = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, (count, 3072), dtype=np.uint8)
    raw = np.concatenate([np.array(labels, dtype=np.uint8)[:, None], pixels], axis=1).tobytes()
    cut = draw(st.sampled_from([0, 0, 0, -1, -3072, 1, 17]))
    return raw[:cut] if cut < 0 else raw + bytes(cut)


@settings(max_examples=200, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(payload=batch_like_bytes())
def test_fuzz_read_binary_batch(fuzz_file, payload):
    fuzz_file.write_bytes(payload)
    try:
        split = data.read_binary_batch(fuzz_file)
    except DataError as error:
        assert str(error) and "\n" not in str(error)
        return
    assert len(payload) % data.RECORD_BYTES == 0
    assert len(split) == len(payload) // data.RECORD_BYTES
    assert split.images.shape == (len(split), 32, 32, 3) and split.images.dtype == np.uint8
    assert split.labels.tolist() == list(payload[:: data.RECORD_BYTES])
    assert split.labels.max() <= 9


# --------------------------------------------------------------------------- python format


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("str_keys", [False, True])
def test_python_batch_reads_legit_pickles(tmp_path, protocol, str_keys):
    images, labels = random_split(6)
    path = tmp_path / "data_batch_1"
    path.write_bytes(python_batch_bytes(images, labels, protocol=protocol, str_keys=str_keys))
    split = data.read_python_batch(path)
    np.testing.assert_array_equal(split.images, images)
    np.testing.assert_array_equal(split.labels, labels)
    assert split.labels.dtype == np.int32


def test_python_batch_reads_numpy1_module_names(tmp_path):
    # Pickles from numpy 1.x (like the official files) name numpy.core, not numpy._core.
    images, labels = random_split(4)
    payload = python_batch_bytes(images, labels, protocol=2)
    assert b"numpy._core.multiarray\n" in payload
    path = tmp_path / "old"
    path.write_bytes(payload.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    np.testing.assert_array_equal(data.read_python_batch(path).images, images)


def python2_batch_bytes(images, labels) -> bytes:
    """A pickle laid out like the official files (Python 2 cPickle of numpy 1.x), written by hand."""
    chw = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)

    def text(raw: bytes) -> bytes:  # SHORT_BINSTRING: a Python 2 str
        return b"U" + bytes([len(raw)]) + raw

    out = b"\x80\x02}(" + text(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + text(b"b") + b"\x87R"
    out += b"(K\x01K" + bytes([len(chw)]) + b"M" + struct.pack("<H", 3072) + b"\x86"
    out += b"cnumpy\ndtype\n" + text(b"u1") + b"K\x00K\x01\x87R"
    out += b"(K\x03" + text(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    out += b"\x89T" + struct.pack("<I", chw.size) + chw.tobytes() + b"tb"
    out += text(b"labels") + b"](" + b"".join(b"K" + bytes([int(v)]) for v in labels) + b"e"
    out += text(b"batch_label") + text(b"training batch 1 of 5") + b"u."
    return out


def test_python_batch_reads_python2_numpy1_pickle(tmp_path):
    images, labels = random_split(5, seed=8)
    path = tmp_path / "data_batch_1"
    path.write_bytes(python2_batch_bytes(images, labels))
    split = data.read_python_batch(path)
    np.testing.assert_array_equal(split.images, images)
    np.testing.assert_array_equal(split.labels, labels)


class _SystemCall:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalCall:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (builtins.exec, (self.code,))


@pytest.mark.parametrize("attack", ["os.system", "builtins.exec"])
def test_python_batch_refuses_malicious_pickle_without_running_it(tmp_path, attack):
    marker = tmp_path / "pwned"
    if attack == "os.system":
        payload = _SystemCall(f"echo pwned > '{marker}'")
    else:
        payload = _EvalCall(f"open({str(marker)!r}, 'w').write('pwned')")
    images, _ = random_split(2)
    path = tmp_path / "evil_batch"
    path.write_bytes(pickle.dumps({b"data": images.reshape(2, -1), b"labels": payload}))
    with pytest.raises(DataError, match="refuses to load pickled class") as excinfo:
        data.read_python_batch(path)
    message = assert_one_line(excinfo)
    assert ("system" in message) if attack == "os.system" else ("builtins.exec" in message)
    assert not marker.exists()


def test_python_batch_refuses_other_numpy_callables(tmp_path):
    class LoadCall:
        def __reduce__(self):
            return (np.load, (str(tmp_path / "x.npy"),))

    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": LoadCall()}))
    with pytest.raises(DataError, match="refuses to load pickled class numpy"):
        data.read_python_batch(path)


def test_python_batch_refuses_codecs_other_than_latin1(tmp_path):
    # _codecs.encode("abc", "rot13") written by hand with protocol-2 opcodes.
    payload = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    path = tmp_path / "codec"
    path.write_bytes(payload)
    with pytest.raises(DataError, match="not a readable CIFAR-10 python batch"):
        data.read_python_batch(path)


@pytest.mark.parametrize(
    "batch, pattern",
    [
        ([1, 2, 3], "does not hold a dict"),
        ({b"labels": [1]}, "no 'data' entry"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "no 'labels' entry"),
        ({b"data": np.zeros((2, 3071), np.uint8), b"labels": [1, 2]}, "must be uint8"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [1, 2]}, "must be uint8"),
        ({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, "holds 0 images"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "must be 2 integers"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}, "must be 2 integers"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]}, "record 1 has label 10"),
    ],
)
def test_python_batch_validates_content(tmp_path, batch, pattern):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match=pattern) as excinfo:
        data.read_python_batch(path)
    assert_one_line(excinfo)


def test_python_batch_not_a_pickle(tmp_path):
    path = tmp_path / "noise"
    path.write_bytes(bytes(range(256)) * 3)
    with pytest.raises(DataError) as excinfo:
        data.read_python_batch(path)
    assert "noise" in assert_one_line(excinfo)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        data.read_python_batch(tmp_path / "empty")


@pytest.fixture(scope="module")
def legit_pickle():
    images, labels = random_split(2, seed=5)
    return python_batch_bytes(images, labels, protocol=2)


@settings(max_examples=100, deadline=None, database=None, derandomize=True)
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_python_batch_mutations(fuzz_file, legit_pickle, flips):
    payload = bytearray(legit_pickle)
    for position, value in flips:
        payload[position % len(payload)] = value
    fuzz_file.write_bytes(bytes(payload))
    try:
        split = data.read_python_batch(fuzz_file)
    except DataError as error:
        assert "\n" not in str(error)
    else:
        assert split.images.shape[1:] == (32, 32, 3) and split.labels.max() <= 9


def test_load_cifar10_reads_python_layout(tmp_path, synthetic_dir):
    folder = tmp_path / "py-parent" / data.PY_FOLDER
    folder.mkdir(parents=True)
    for bin_name, py_name in zip(ALL_BIN, data.PY_TRAIN_FILES + (data.PY_TEST_FILE,)):
        split = data.read_binary_batch(synthetic_dir / bin_name)
        (folder / py_name).write_bytes(python_batch_bytes(split.images, split.labels, protocol=2))
    from_py = data.load_cifar10(tmp_path / "py-parent", valid_size=50)
    from_bin = data.load_cifar10(synthetic_dir, valid_size=50)
    assert from_py.data_dir == str(folder.resolve())
    for name in ("train", "valid", "test"):
        np.testing.assert_array_equal(getattr(from_py, name).images, getattr(from_bin, name).images)
        np.testing.assert_array_equal(getattr(from_py, name).labels, getattr(from_bin, name).labels)
    assert from_py.mean == from_bin.mean and from_py.std == from_bin.std


# --------------------------------------------------------------------------- splits


def test_split_sizes_and_partition(tmp_path):
    total = write_indexed_cifar(tmp_path)
    cifar = data.load_cifar10(tmp_path, valid_size=37, seed=3)
    assert (len(cifar.train), len(cifar.valid), len(cifar.test)) == (total - 37, 37, 12)
    train, valid = indices_of(cifar.train), indices_of(cifar.valid)
    assert not set(train) & set(valid)
    assert sorted(np.concatenate([train, valid]).tolist()) == list(range(total))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(valid) > 0)  # original order kept
    expected_valid = np.sort(np.random.default_rng(3).permutation(total)[:37])
    np.testing.assert_array_equal(valid, expected_valid)
    np.testing.assert_array_equal(cifar.train.labels, train % 10)  # labels travel with images
    assert cifar.data_dir == str(tmp_path.resolve())


def test_split_is_deterministic_by_seed(tmp_path):
    write_indexed_cifar(tmp_path)
    first = indices_of(data.load_cifar10(tmp_path, valid_size=20, seed=1).valid)
    again = indices_of(data.load_cifar10(tmp_path, valid_size=20, seed=1).valid)
    other = indices_of(data.load_cifar10(tmp_path, valid_size=20, seed=2).valid)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_train_examples_keeps_first_of_remaining(tmp_path):
    total = write_indexed_cifar(tmp_path)
    full = indices_of(data.load_cifar10(tmp_path, valid_size=30, seed=4).train)
    cifar = data.load_cifar10(tmp_path, valid_size=30, train_examples=11, seed=4)
    np.testing.assert_array_equal(indices_of(cifar.train), full[:11])
    assert len(cifar.valid) == 30
    assert len(data.load_cifar10(tmp_path, valid_size=0, train_examples=total).train) == total


def test_valid_size_zero_gives_empty_valid_split(tmp_path):
    total = write_indexed_cifar(tmp_path)
    cifar = data.load_cifar10(tmp_path, valid_size=0)
    assert len(cifar.valid) == 0 and cifar.valid.images.shape == (0, 32, 32, 3)
    np.testing.assert_array_equal(indices_of(cifar.train), np.arange(total))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"valid_size": -1}, "validation size -1"),
        ({"valid_size": 120}, "validation size 120"),
        ({"valid_size": 10000}, "validation size 10000"),
        ({"valid_size": 20, "train_examples": 0}, "train examples 0"),
        ({"valid_size": 20, "train_examples": 101}, "train examples 101"),
        ({"valid_size": 2.5}, "whole number"),
        ({"valid_size": 10, "train_examples": True}, "whole number"),
    ],
)
def test_split_arguments_out_of_range(tmp_path, kwargs, pattern):
    write_indexed_cifar(tmp_path)  # 120 training images
    with pytest.raises(DataError, match=pattern) as excinfo:
        data.load_cifar10(tmp_path, **kwargs)
    assert_one_line(excinfo)


def test_load_cifar10_reports_corrupt_file(tmp_path, synthetic_dir):
    path = synthetic_dir / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="data_batch_3.bin"):
        data.load_cifar10(synthetic_dir, valid_size=10)


def test_split_validates_its_arrays():
    images, labels = random_split(3)
    split = data.Split(images, labels.astype(np.int64))
    assert split.labels.dtype == np.int32 and len(split) == 3
    with pytest.raises(ValueError):
        data.Split(images.astype(np.float32), labels)
    with pytest.raises(ValueError):
        data.Split(images[:, :16], labels)
    with pytest.raises(ValueError):
        data.Split(images, labels[:2])
    with pytest.raises(ValueError):
        data.Split(images, np.array([0, 1, 10]))
    with pytest.raises(AttributeError):  # frozen
        split.images = images


# --------------------------------------------------------------------------- statistics


def test_mean_and_std_come_from_train_split_only(synthetic_dir):
    cifar = data.load_cifar10(synthetic_dir, valid_size=60, seed=0)
    pixels = cifar.train.images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(cifar.mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(cifar.std, pixels.std(axis=0), rtol=1e-12)
    everything = np.concatenate([cifar.train.images, cifar.valid.images]).reshape(-1, 3).astype(np.float64)
    assert not np.allclose(cifar.mean, everything.mean(axis=0), rtol=1e-9)
    assert all(isinstance(v, float) for v in cifar.mean + cifar.std)


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_channel_stats_matches_numpy(chunk):
    images, _ = random_split(10, seed=7)
    images[..., 2] //= 4  # channels must differ
    mean, std = data.channel_stats(images, chunk=chunk)
    pixels = images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(axis=0), rtol=1e-12)
    float_mean, float_std = data.channel_stats(images.astype(np.float32), chunk=chunk)
    np.testing.assert_allclose(float_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(float_std, std, rtol=1e-9)


def test_channel_stats_constant_images_have_zero_std():
    images = np.full((4, 32, 32, 3), 200, dtype=np.uint8)
    mean, std = data.channel_stats(images)
    assert mean == (200.0, 200.0, 200.0) and std == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        data.channel_stats(images[:0])


# --------------------------------------------------------------------------- augmentation


def test_pad_crop_flip_matches_a_per_image_reference():
    images, _ = random_split(50, seed=11)
    out = synthetic.pad_crop_flip(images, np.random.default_rng(5))
    assert out.shape == images.shape and out.dtype == images.dtype
    replay = np.random.default_rng(5)
    rows, cols = replay.integers(0, 9, 50), replay.integers(0, 9, 50)
    flips = replay.random(50) < 0.5
    for i in range(50):
        padded = np.zeros((40, 40, 3), dtype=np.uint8)
        padded[4:36, 4:36] = images[i]
        window = padded[rows[i] : rows[i] + 32, cols[i] : cols[i] + 32]
        np.testing.assert_array_equal(out[i], window[:, ::-1] if flips[i] else window)


def test_pad_crop_flip_covers_every_offset_and_both_flips():
    # Channel 0 counts columns 1..32 and channel 1 counts rows 1..32, so the
    # centre pixel of each output tells its crop offset and its flip.
    images = np.zeros((3000, 32, 32, 3), dtype=np.uint8)
    images[..., 0] = np.arange(1, 33)[None, None, :]
    images[..., 1] = np.arange(1, 33)[None, :, None]
    out = synthetic.pad_crop_flip(images, np.random.default_rng(0)).astype(np.int64)
    centre, right = out[:, 16, 16], out[:, 16, 17]
    flipped = right[:, 0] < centre[:, 0]
    col_offsets = np.where(flipped, centre[:, 0] - 12, centre[:, 0] - 13)
    row_offsets = centre[:, 1] - 13
    assert set(col_offsets.tolist()) == set(range(9)) and set(row_offsets.tolist()) == set(range(9))
    assert 0.45 < flipped.mean() < 0.55
    # What falls outside the image is zero padding.
    padded_rows = np.pad(np.arange(1, 33), 4)
    for i in range(50):
        np.testing.assert_array_equal(out[i, :, 16, 1], padded_rows[row_offsets[i] : row_offsets[i] + 32])


def test_pad_crop_flip_is_deterministic():
    images, _ = random_split(8)
    np.testing.assert_array_equal(synthetic.pad_crop_flip(images, 3), synthetic.pad_crop_flip(images, np.random.default_rng(3)))


# --------------------------------------------------------------------------- synthetic data


def test_write_synthetic_cifar_is_deterministic_and_complete(tmp_path):
    first = synthetic.write_synthetic_cifar(tmp_path / "a", n_train_per_batch=20, n_test=10, seed=3)
    second = synthetic.write_synthetic_cifar(tmp_path / "b", n_train_per_batch=20, n_test=10, seed=3)
    other = synthetic.write_synthetic_cifar(tmp_path / "c", n_train_per_batch=20, n_test=10, seed=4)
    assert first == tmp_path / "a"
    for name in ALL_BIN + (data.META_FILE,):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / data.TEST_FILE).read_bytes() != (other / data.TEST_FILE).read_bytes()
    assert (first / data.META_FILE).read_text().split() == list(data.CLASS_NAMES)
    assert len(data.read_binary_batch(first / data.TRAIN_FILES[4])) == 20
    assert len(data.read_binary_batch(first / data.TEST_FILE)) == 10
    assert not list(first.glob(".*"))


def test_synthetic_learnable_classes_are_recoverable(synthetic_dir):
    cifar = data.load_cifar10(synthetic_dir, valid_size=50)
    assert np.bincount(cifar.test.labels, minlength=10).min() >= 2
    # A nearest-class-mean classifier on the mean colour is perfect.
    def features(split):
        return split.images.reshape(len(split), -1, 3).mean(axis=1)

    centres = np.stack([features(cifar.train)[cifar.train.labels == c].mean(axis=0) for c in range(10)])
    distances = ((features(cifar.test)[:, None, :] - centres[None]) ** 2).sum(axis=2)
    assert (distances.argmin(axis=1) == cifar.test.labels).mean() == 1.0


def test_synthetic_unlearnable_is_noise(tmp_path):
    folder = synthetic.write_synthetic_cifar(tmp_path, n_train_per_batch=30, n_test=30, learnable=False)
    split = data.read_binary_batch(folder / data.TEST_FILE)
    assert split.images.std() > 60 and split.labels.max() <= 9


# --------------------------------------------------------------------------- find_data_dir


def test_find_data_dir_order_explicit_then_env_then_cache(tmp_path, monkeypatch):
    explicit = synthetic.write_synthetic_cifar(tmp_path / "explicit", n_train_per_batch=2, n_test=2)
    env = synthetic.write_synthetic_cifar(tmp_path / "env", n_train_per_batch=2, n_test=2)
    cache = tmp_path / "cache"
    cached = synthetic.write_synthetic_cifar(cache / data.BIN_FOLDER, n_train_per_batch=2, n_test=2)
    monkeypatch.setenv(fetch.ENV_DATA_DIR, str(env))
    assert fetch.find_data_dir(explicit, cache_dir=cache, download=False) == explicit.resolve()
    assert fetch.find_data_dir(None, cache_dir=cache, download=False) == env.resolve()
    monkeypatch.delenv(fetch.ENV_DATA_DIR)
    assert fetch.find_data_dir(None, cache_dir=cache, download=False) == cached.resolve()
    monkeypatch.setenv(fetch.ENV_DATA_DIR, "")  # empty means unset
    assert fetch.find_data_dir(cache_dir=cache, download=False) == cached.resolve()


def test_a_runs_saved_folder_comes_after_env_and_before_the_cache(tmp_path, monkeypatch):
    saved = synthetic.write_synthetic_cifar(tmp_path / "saved", n_train_per_batch=2, n_test=2)
    env = synthetic.write_synthetic_cifar(tmp_path / "env", n_train_per_batch=2, n_test=2)
    cache = tmp_path / "cache"
    cached = synthetic.write_synthetic_cifar(cache / data.BIN_FOLDER, n_train_per_batch=2, n_test=2)
    find = dict(cache_dir=cache, download=False)
    monkeypatch.setenv(fetch.ENV_DATA_DIR, str(env))
    assert fetch.find_data_dir(None, saved_dir=saved, **find) == env.resolve()
    monkeypatch.delenv(fetch.ENV_DATA_DIR)
    assert fetch.find_data_dir(None, saved_dir=saved, **find) == saved.resolve()
    # Gone (a run folder copied from another machine): the cache, as with no folder.
    assert fetch.find_data_dir(None, saved_dir=tmp_path / "gone", **find) == cached.resolve()
    # A folder named on the command line is never replaced, even by a good saved one.
    with pytest.raises(DataError, match="does not exist"):
        fetch.find_data_dir(tmp_path / "typo", saved_dir=saved, **find)


def test_find_data_dir_default_cache_locations(tmp_path, monkeypatch):
    xdg_data = synthetic.write_synthetic_cifar(
        tmp_path / "xdg-cache" / "resnet-graph" / data.BIN_FOLDER, n_train_per_batch=2, n_test=2
    )
    assert fetch.default_cache_dir() == tmp_path / "xdg-cache" / "resnet-graph"
    assert fetch.find_data_dir(download=False) == xdg_data.resolve()
    monkeypatch.delenv("XDG_CACHE_HOME")
    home_data = synthetic.write_synthetic_cifar(
        tmp_path / "home" / ".cache" / "resnet-graph" / data.BIN_FOLDER, n_train_per_batch=2, n_test=2
    )
    assert fetch.find_data_dir(download=False) == home_data.resolve()


def test_find_data_dir_accepts_parent_folders(tmp_path):
    binary = synthetic.write_synthetic_cifar(tmp_path / "bin-parent" / data.BIN_FOLDER, n_train_per_batch=2, n_test=2)
    assert fetch.find_data_dir(tmp_path / "bin-parent") == binary.resolve()
    py_folder = tmp_path / "py-parent" / data.PY_FOLDER
    py_folder.mkdir(parents=True)
    images, labels = random_split(2)
    for name in data.PY_TRAIN_FILES + (data.PY_TEST_FILE,):
        (py_folder / name).write_bytes(python_batch_bytes(images, labels))
    assert fetch.find_data_dir(tmp_path / "py-parent") == py_folder.resolve()
    assert fetch.find_data_dir(str(py_folder)) == py_folder.resolve()


def test_find_data_dir_explicit_folder_missing_a_file(tmp_path, monkeypatch):
    folder = synthetic.write_synthetic_cifar(tmp_path / "d", n_train_per_batch=2, n_test=2)
    (folder / "data_batch_4.bin").unlink()
    env = synthetic.write_synthetic_cifar(tmp_path / "env", n_train_per_batch=2, n_test=2)
    monkeypatch.setenv(fetch.ENV_DATA_DIR, str(env))
    with pytest.raises(DataError, match="data_batch_4.bin is missing") as excinfo:
        fetch.find_data_dir(folder, download=False)  # no fall-back to the env folder
    assert "pass --data-dir PATH to a folder with the CIFAR-10 binary files" in assert_one_line(excinfo)


def test_find_data_dir_empty_bin_subfolder_is_reported(tmp_path):
    (tmp_path / "parent" / data.BIN_FOLDER).mkdir(parents=True)
    with pytest.raises(DataError) as excinfo:
        fetch.find_data_dir(tmp_path / "parent")
    assert f"{data.BIN_FOLDER}/data_batch_1.bin is missing" in assert_one_line(excinfo)


def test_find_data_dir_env_folder_problems_name_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch.ENV_DATA_DIR, str(tmp_path / "not-there"))
    with pytest.raises(DataError, match="does not exist") as excinfo:
        fetch.find_data_dir(download=False)
    message = assert_one_line(excinfo)
    assert fetch.ENV_DATA_DIR in message and "--data-dir PATH" in message
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        fetch.find_data_dir(tmp_path / "a-file")


def test_find_data_dir_cache_without_download(tmp_path):
    with pytest.raises(DataError, match="downloading is off") as excinfo:
        fetch.find_data_dir(cache_dir=tmp_path / "cache", download=False)
    assert "--data-dir PATH" in assert_one_line(excinfo)
    assert isinstance(excinfo.value, UserError)


def test_find_data_dir_downloads_into_cache(tmp_path, served_archive):
    url, md5, _ = served_archive
    cache = tmp_path / "cache"
    found = fetch.find_data_dir(cache_dir=cache, url=url, md5=md5, progress=False, allow_insecure=True)
    assert found == (cache / data.BIN_FOLDER).resolve()
    assert len(data.load_cifar10(found, valid_size=10).test) == 30
    # Second call uses the cache without the network.
    assert fetch.find_data_dir(cache_dir=cache, url="https://127.0.0.1:9/none", download=True) == found


# --------------------------------------------------------------------------- download_cifar10


def test_download_success(tmp_path, served_archive, synthetic_dir):
    url, md5, size = served_archive
    cache = tmp_path / "cache"
    folder = fetch.download_cifar10(
        cache, url=url, md5=md5.upper(), expected_size=size, progress=False, allow_insecure=True
    )
    assert folder == cache / data.BIN_FOLDER
    for name in ALL_BIN + (data.META_FILE,):
        assert (folder / name).read_bytes() == (synthetic_dir / name).read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == [data.BIN_FOLDER]  # no temp files left


def test_download_replaces_an_incomplete_folder(tmp_path, served_archive):
    url, md5, _ = served_archive
    cache = tmp_path / "cache"
    (cache / data.BIN_FOLDER).mkdir(parents=True)
    (cache / data.BIN_FOLDER / "data_batch_1.bin").write_bytes(b"partial")
    folder = fetch.download_cifar10(cache, url=url, md5=md5, progress=False, allow_insecure=True)
    assert len(data.read_binary_batch(folder / "data_batch_1.bin")) == 40
    assert sorted(p.name for p in cache.iterdir()) == [data.BIN_FOLDER]


def test_download_from_file_url(tmp_path, synthetic_dir):
    archive = tmp_path / "local.tar.gz"
    payload = make_tar_gz(archive, cifar_members(synthetic_dir))
    folder = fetch.download_cifar10(
        tmp_path / "cache", url=archive.as_uri(), md5=hashlib.md5(payload).hexdigest(), allow_insecure=True
    )
    assert (folder / data.TEST_FILE).is_file()


def test_download_wrong_md5_leaves_nothing(tmp_path, served_archive):
    url, _, _ = served_archive
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="MD5") as excinfo:
        fetch.download_cifar10(cache, url=url, md5="0" * 32, progress=False, allow_insecure=True)
    assert "download it by hand and pass --data-dir PATH" in assert_one_line(excinfo)
    assert list(cache.iterdir()) == []


def test_download_wrong_size_leaves_nothing(tmp_path, served_archive):
    url, md5, size = served_archive
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="bytes"):
        fetch.download_cifar10(cache, url=url, md5=md5, expected_size=size - 1, allow_insecure=True)
    with pytest.raises(DataError, match="bytes"):
        fetch.download_cifar10(cache, url=url, md5=md5, expected_size=size + 1, allow_insecure=True)
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize(
    "bad_member, reason",
    [
        (("../evil", "file", b"gotcha"), "'..' in path"),
        ((f"{data.BIN_FOLDER}/../../evil", "file", b"gotcha"), "'..' in path"),
        (("/tmp/evil-absolute-resnet-graph-test", "file", b"gotcha"), "absolute path"),
        ((f"{data.BIN_FOLDER}/link", "symlink", "/etc/passwd"), "symlink"),
        ((f"{data.BIN_FOLDER}/hard", "hardlink", f"{data.BIN_FOLDER}/test_batch.bin"), "hard link"),
        ((f"{data.BIN_FOLDER}/pipe", "fifo", None), "device or special file"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "fifo"],
)
def test_download_refuses_unsafe_archives(tmp_path, http_root, synthetic_dir, bad_member, reason):
    url, md5 = serve_tar(http_root, "bad.tar.gz", cifar_members(synthetic_dir) + [bad_member])
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(DataError, match="unsafe member") as excinfo:
        fetch.download_cifar10(cache, url=url, md5=md5, progress=False, allow_insecure=True)
    message = assert_one_line(excinfo)
    assert f"({reason})" in message and "download it by hand and pass --data-dir PATH" in message
    assert list(cache.iterdir()) == []  # nothing extracted, not even the good members
    assert not (tmp_path / "deep" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not Path("/tmp/evil-absolute-resnet-graph-test").exists()


def test_download_archive_without_the_binary_folder(tmp_path, http_root, synthetic_dir):
    members = [m for m in cifar_members(synthetic_dir) if not m[0].endswith("data_batch_2.bin")]
    url, md5 = serve_tar(http_root, "short.tar.gz", members)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="lacks cifar-10-batches-bin/data_batch_2.bin"):
        fetch.download_cifar10(cache, url=url, md5=md5, allow_insecure=True)
    assert list(cache.iterdir()) == []


def test_download_not_a_tar_archive(tmp_path, http_root):
    root, base = http_root
    payload = b"this is not a tar.gz archive" * 10
    (root / "junk.tar.gz").write_bytes(payload)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="could not download") as excinfo:
        fetch.download_cifar10(
            cache, url=f"{base}/junk.tar.gz", md5=hashlib.md5(payload).hexdigest(), allow_insecure=True
        )
    assert_one_line(excinfo)
    assert list(cache.iterdir()) == []


def test_download_http_error_and_refused_connection(tmp_path, http_root):
    _, base = http_root
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="HTTP 404") as excinfo:
        fetch.download_cifar10(cache, url=f"{base}/missing.tar.gz", md5="0" * 32, allow_insecure=True)
    assert "download it by hand and pass --data-dir PATH" in assert_one_line(excinfo)
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DataError, match="could not download"):
        fetch.download_cifar10(
            cache, url=f"http://127.0.0.1:{port}/x.tar.gz", md5="0" * 32, allow_insecure=True, timeout=5
        )
    assert list(cache.iterdir()) == []


def test_download_requires_https_by_default(tmp_path, served_archive):
    url, md5, _ = served_archive
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="only https:// URLs are allowed") as excinfo:
        fetch.download_cifar10(cache, url=url, md5=md5)
    assert "download it by hand and pass --data-dir PATH" in assert_one_line(excinfo)
    with pytest.raises(DataError, match="only https://"):
        fetch.download_cifar10(cache, url=(tmp_path / "x.tar.gz").as_uri(), md5=md5)
    with pytest.raises(DataError, match="only https://"):
        fetch.download_cifar10(cache, url="ftp://127.0.0.1/x.tar.gz", md5=md5, allow_insecure=True)
    with pytest.raises(DataError, match="only https://"):
        fetch.find_data_dir(cache_dir=cache, url=url, md5=md5)
    assert not cache.exists()


def test_download_follows_redirects_only_to_allowed_schemes(tmp_path, http_root, served_archive):
    url, md5, _ = served_archive
    _, base = http_root
    folder = fetch.download_cifar10(tmp_path / "ok", url=f"{base}/redirect?{url}", md5=md5, allow_insecure=True)
    assert (folder / data.TEST_FILE).is_file()
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="refused redirect to ftp://"):
        fetch.download_cifar10(cache, url=f"{base}/redirect?ftp://127.0.0.1/x", md5=md5, allow_insecure=True)
    assert list(cache.iterdir()) == []


def test_download_requires_a_checksum(tmp_path, served_archive):
    url, _, _ = served_archive
    with pytest.raises(DataError, match="without an MD5"):
        fetch.download_cifar10(tmp_path / "cache", url=url, md5=None, allow_insecure=True)


def test_official_constants():
    assert fetch.OFFICIAL_URL.startswith("https://")
    assert len(fetch.OFFICIAL_MD5) == 32 and fetch.OFFICIAL_SIZE == 170052171
    assert data.TRAIN_FILES == tuple(f"data_batch_{i}.bin" for i in range(1, 6))
    assert data.CLASS_NAMES[0] == "airplane" and data.CLASS_NAMES[9] == "truck" and len(data.CLASS_NAMES) == 10


def test_data_module_does_not_import_tensorflow():
    source = Path(data.__file__).read_text()
    assert "import tensorflow" not in source and "from tensorflow" not in source
