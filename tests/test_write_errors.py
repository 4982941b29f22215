"""Failed writes (a full disk, a read-only folder) give one true line: the file system's
reason in words, whether a checkpoint is intact, and what --resume then does."""

import errno
import glob
import os

import pytest
import tensorflow as tf
from click.testing import CliRunner

from resnet_graph import checkpoint, history
from resnet_graph.cli import cli
from resnet_graph.fsutil import write_failure_reason

tf1 = tf.compat.v1
TINY = ["--depth", "8", "--batch-size", "50", "--valid-size", "50"]
NO_SPACE = "No space left on device"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


class FullDiskRecords:
    """tf.io.TFRecordWriter whose writes fail as on a full disk once it has been
    flushed ``flushes`` times (0: from the first write)."""

    real = tf.io.TFRecordWriter

    def __init__(self, path, flushes=0):
        self.inner = self.real(path)
        self.path, self.flushes = path, flushes

    def write(self, record):
        if self.flushes <= 0:
            raise tf.errors.ResourceExhaustedError(None, None, f"{self.path}; {NO_SPACE}")
        self.inner.write(record)

    def flush(self):
        self.inner.flush()
        self.flushes -= 1

    def close(self):
        self.inner.close()


def fail_saves_from(monkeypatch, first_call):
    """Saver.save fails as TensorFlow's SaveV2 does on a full disk from its n-th call."""
    real = tf1.train.Saver.save
    calls = []

    def save(self, sess, path, *args, **kw):
        calls.append(path)
        if len(calls) >= first_call:
            raise tf.errors.ResourceExhaustedError(
                None, None, f"Graph execution error:\n\nNode: 'save/SaveV2'\n{path}.data-00000-of"
                            f"-00001.tempstate123; {NO_SPACE}\n\t [[{{{{node save/SaveV2}}}}]]")
        return real(self, sess, path, *args, **kw)

    monkeypatch.setattr(tf1.train.Saver, "save", save)


def test_reasons_in_words():
    assert write_failure_reason(OSError(errno.ENOSPC, "x")) == "no space left on device"
    assert write_failure_reason(OSError(errno.EROFS, "x")) == "read-only file system"
    assert write_failure_reason(PermissionError(errno.EACCES, "x")) == "permission denied"
    tf_error = tf.errors.ResourceExhaustedError(
        None, None, "Graph execution error:\n\nNode: 'save/SaveV2'\nrun/model.ckpt-5.data; "
                    "Disk quota exceeded\n")
    assert write_failure_reason(tf_error) == "disk quota exceeded"
    # Neither an errno nor a known text, and the folder is fine: the message's own words.
    odd = tf.errors.UnknownError(None, None, "Graph execution error:\n\nrun/x; Stale handle\n")
    assert write_failure_reason(odd, os.getcwd()) == "Stale handle"


def test_full_disk_at_the_first_writes_says_that_resume_starts_again(tiny_data_dir, tmp_path,
                                                                    monkeypatch):
    out = tmp_path / "out"
    run_dir = out / "original-8"
    train = ["train", "original", *TINY, "--epochs", "2", "--data-dir", tiny_data_dir,
             "--out", out]
    # 1. The events file (the graph, its first record after the version) fills the disk.
    monkeypatch.setattr(tf.io, "TFRecordWriter", FullDiskRecords)
    line = one_error_line(invoke(*train))
    assert line.startswith(f"Error: could not write the TensorBoard events file {run_dir}/"
                           "events.out.tfevents.")
    assert line.endswith(": no space left on device; no checkpoint of this run exists yet: "
                         "free space, then --resume starts it again from epoch 1")
    assert not glob.glob(str(run_dir / "events.out.tfevents.*"))   # the partial file is gone
    assert (run_dir / "config.json").is_file()
    monkeypatch.undo()

    # 2. --resume as told; now the first checkpoint (the best one, after epoch 1) fails.
    fail_saves_from(monkeypatch, 1)
    result = invoke(*train, "--resume", "--name", "original-8")
    assert "resuming original-8: it has no checkpoint yet, so it starts at epoch 1" in result.stdout
    assert one_error_line(result) == (
        f"Error: could not write a checkpoint in {run_dir / 'best'}: no space left on device; "
        "no checkpoint of this run exists yet: free space, then --resume starts it again from "
        "epoch 1")
    assert checkpoint.latest(run_dir) is None
    assert history.read_run(out / "histories.h5", "original-8").epochs == 1   # its row, ahead
    monkeypatch.undo()

    # 3. Space again: --resume trains from epoch 1 and ends with one row per epoch.
    result = invoke(*train, "--resume", "--name", "original-8")
    assert result.exit_code == 0, result.output
    run = history.read_run(out / "histories.h5", "original-8")
    assert list(run.columns["epoch"]) == [1, 2] and "test_acc" in run.attrs


def test_full_disk_at_a_later_events_write_keeps_the_checkpoint_and_the_complete_epochs(
        tiny_data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_dir = out / "original-8"
    train = ["train", "original", *TINY, "--epochs", "2", "--data-dir", tiny_data_dir,
             "--out", out]
    # Flushed twice (the graph, then epoch 1): epoch 2's first record fails.
    monkeypatch.setattr(tf.io, "TFRecordWriter", lambda path: FullDiskRecords(path, flushes=2))
    line = one_error_line(invoke(*train))
    assert line.endswith(": no space left on device; the previous checkpoint model.ckpt-5 "
                         "(1 epoch done) is intact: free space, then --resume continues from it")
    monkeypatch.undo()
    files = glob.glob(str(run_dir / "events.out.tfevents.*"))
    assert len(files) == 1   # cut back to epoch 1, and every record of it reads
    steps = [e.step for e in tf1.train.summary_iterator(files[0])
             for v in e.summary.value if v.tag == "epoch/valid_acc"]
    assert steps == [5]
    result = invoke(*train, "--resume", "--name", "original-8")
    assert result.exit_code == 0, result.output
    assert "resuming original-8 after epoch 1 from" in result.stdout
    run = history.read_run(out / "histories.h5", "original-8")
    assert list(run.columns["epoch"]) == [1, 2] and "test_acc" in run.attrs


@pytest.mark.parametrize("code, words", [(errno.EROFS, "make {} writable"),
                                         (errno.ENOSPC, "free space")])
def test_a_config_or_best_json_that_cannot_be_written_is_one_line(tmp_path, code, words):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "atomic_write_text", refuse)
        with pytest.raises(checkpoint.CheckpointError) as caught:
            checkpoint.write_config_data(tmp_path, {"a": 1})
    assert str(caught.value).startswith(f"could not write {tmp_path / 'config.json'}: "
                                        f"{os.strerror(code).lower()}; it is unchanged")
    assert checkpoint.resume_advice(tmp_path, os.strerror(code).lower()) == (
        f"no checkpoint of this run exists yet: {words.format(tmp_path)}, then --resume "
        "starts it again from epoch 1")
