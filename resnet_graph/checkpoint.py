"""Run folders: checkpoints (``tf.compat.v1.train.Saver``), config.json, a run lock.

A Saver checkpoint is written as new ``.index``/``.data`` files and only then
named in the ``checkpoint`` state file, which TensorFlow replaces atomically;
so a process that dies while saving leaves the previous checkpoint as the
latest one. ``config.json`` is written to a temporary file, synced and
renamed for the same reason (resnet_graph.fsutil).
"""

import contextlib
import json
import pathlib
from typing import Optional

import tensorflow as tf

from .config import CONFIG_FILE, TrainConfig
from .errors import CheckpointError, first_line
from .fsutil import LockBusy, atomic_write_text, exclusive_lock, temp_pattern, write_failure_reason

tf1 = tf.compat.v1

CHECKPOINT_PREFIX = "model.ckpt"
LOCK_FILE = ".lock"
BEST_DIR = "best"            # <run>/best/: the checkpoint with the best validation accuracy
BEST_INFO = "best.json"      # <run>/best/best.json: its epoch and validation accuracy


def write_config(run_dir, cfg: TrainConfig, **extra) -> None:
    """Store the resolved config plus ``extra`` keys (normalisation, data dir, ...)."""
    data = cfg.to_dict()
    data.update(extra)
    write_config_data(run_dir, data)


def write_config_data(run_dir, data: dict) -> None:
    """Replace config.json with ``data`` (atomically: a reader sees the old or the new)."""
    path = pathlib.Path(run_dir) / CONFIG_FILE
    try:
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))
    except OSError as e:
        raise CheckpointError(f"could not write {path}: {write_failure_reason(e, run_dir)}; "
                              "it is unchanged: free space (or make the folder writable) and "
                              "run the same command again") from None


def resume_advice(run_dir, reason: str = "") -> str:
    """What to do after a failed write into ``run_dir`` for ``reason`` (see
    fsutil.write_failure_reason), and what ``--resume`` then does: go on from the latest
    checkpoint, which it names, or start again from epoch 1 when there is none yet."""
    if "space" in reason or "quota" in reason:
        fix = "free space"
    elif "read-only" in reason or "permission" in reason or "not permitted" in reason:
        fix = f"make {run_dir} writable"
    else:
        fix = "fix that"
    prefix = latest(run_dir)
    if prefix is None:
        return (f"no checkpoint of this run exists yet: {fix}, then --resume starts it "
                "again from epoch 1")
    try:
        n = epochs_done(run_dir)
        done = f" ({n} epoch{'' if n == 1 else 's'} done)"
    except CheckpointError:
        done = ""
    return (f"the previous checkpoint {pathlib.Path(prefix).name}{done} is intact: {fix}, "
            "then --resume continues from it")


def epochs_done(run_dir) -> Optional[int]:
    """The epochs the latest checkpoint of ``run_dir`` has finished; None without one."""
    prefix = latest(run_dir)
    if prefix is None:
        return None
    return int(read_tensor(prefix, "epochs_done"))


def read_tensor(prefix: str, name: str, default=None):
    """The value of variable ``name`` in checkpoint ``prefix`` (``default`` when it has
    none and a default is given); CheckpointError naming damaged files as damaged."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        if default is not None and not reader.has_tensor(name):
            return default
        return reader.get_tensor(name)
    except (tf.errors.OpError, ValueError, IndexError, RuntimeError) as e:
        broken = damage(prefix)
        if broken is not None:
            raise restore_error(prefix, e) from None
        raise CheckpointError(f"checkpoint {prefix} cannot be read ({first_line(e)}); "
                              "was it written by resnet-graph?") from None


def read_config(run_dir) -> dict:
    """The run's config.json as a dict; CheckpointError if missing or unreadable."""
    path = pathlib.Path(run_dir) / CONFIG_FILE
    if not pathlib.Path(run_dir).is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist: pass --ckpt a run folder "
                              "made by 'resnet-graph train'")
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {CONFIG_FILE}: pass --ckpt a run folder made by "
                              "'resnet-graph train'")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError(f"it holds a JSON {type(data).__name__}, not an object")
        TrainConfig.from_dict(data)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid run config ({e})") from None
    if "normalization" not in data:
        raise CheckpointError(f"{path} lacks the normalisation statistics; retrain the run")
    return data


def latest(run_dir) -> Optional[str]:
    """Prefix of the newest complete checkpoint in ``run_dir``, or None."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        return None
    prefix = tf1.train.latest_checkpoint(str(run_dir))
    if prefix and pathlib.Path(prefix + ".index").is_file():
        return prefix
    return None


def require_latest(run_dir, best: bool = False) -> str:
    """The latest checkpoint of ``run_dir`` (or, with ``best``, its best-validation one)."""
    if best:
        prefix = latest(pathlib.Path(run_dir) / BEST_DIR)
        if prefix is None:
            raise CheckpointError(f"{run_dir} has no best checkpoint (it is kept only when the "
                                  "run holds out a validation split); drop --best")
        return prefix
    prefix = latest(run_dir)
    if prefix is None:
        raise CheckpointError(f"no checkpoint in {run_dir}: pass --ckpt a run folder that "
                              "'resnet-graph train' has written")
    return prefix


def save_best(sess, saver, run_dir, epoch: int, valid_acc: float) -> str:
    """Keep the model of ``epoch`` as the run's best checkpoint (``saver`` keeps one).

    The Saver replaces its state file atomically, so a kill leaves the previous
    best checkpoint in place; best.json (for people and reports) follows it.
    """
    folder = pathlib.Path(run_dir) / BEST_DIR
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise _write_error(folder, e, run_dir) from None
    prefix = save(sess, saver, folder, epoch, run_root=run_dir)
    try:
        atomic_write_text(folder / BEST_INFO, json.dumps(
            {"epoch": epoch, "valid_acc": valid_acc, "checkpoint": pathlib.Path(prefix).name}))
    except OSError as e:
        raise _write_error(folder, e, run_dir) from None
    return prefix


def read_best(run_dir) -> Optional[dict]:
    """best.json of ``run_dir`` as a dict (epoch, valid_acc, checkpoint), or None."""
    path = pathlib.Path(run_dir) / BEST_DIR / BEST_INFO
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def make_saver(max_to_keep: int = 3):
    """A Saver for every global variable (weights, statistics, optimizer state,
    step and epoch counters); the in-graph data copies are local and not saved."""
    return tf1.train.Saver(tf1.global_variables(), max_to_keep=max_to_keep,
                           save_relative_paths=True)


def save(sess, saver, run_dir, step: int, *, run_root=None) -> str:
    """Write a checkpoint; on a write failure the previous one stays the latest, and
    the CheckpointError says why it failed and what --resume of the run folder
    ``run_root`` (default ``run_dir``) then does."""
    try:
        with sess.graph.as_default():  # Saver would take the eager path outside its graph
            return saver.save(sess, str(pathlib.Path(run_dir) / CHECKPOINT_PREFIX),
                              global_step=step, write_meta_graph=False)
    except (tf.errors.OpError, OSError) as e:
        raise _write_error(run_dir, e, run_root or run_dir) from None


def _write_error(folder, error, run_root) -> CheckpointError:
    reason = write_failure_reason(error, folder)
    return CheckpointError(f"could not write a checkpoint in {folder}: {reason}; "
                           f"{resume_advice(run_root, reason)}")


def adopt_existing(saver, folder) -> None:
    """Let ``saver`` manage the checkpoints already listed in ``folder``'s state
    file, so that its ``max_to_keep`` deletes them in turn after a resume (a new
    Saver only deletes what it wrote itself)."""
    state = tf1.train.get_checkpoint_state(str(folder))
    if state is not None and state.all_model_checkpoint_paths:
        saver.recover_last_checkpoints(list(state.all_model_checkpoint_paths))


# Variables that versions after the first added to the training graph, with what a run
# restored from a checkpoint written before them goes on with (their initial value).
LATER_VARIABLES = {
    "loss_scaling/epoch_skipped": "fp16 steps skipped in the resumed epoch before the "
                                  "checkpoint are not counted in its skipped_steps (the "
                                  "run-wide count and the position are)",
}


def restore(sess, saver, prefix: str) -> dict:
    """Restore ``prefix`` into the session with ``saver``. A checkpoint of an earlier
    version that lacks only variables added since (LATER_VARIABLES) is restored too:
    what it holds is loaded, the rest initialised; returns those variables with what
    their initial value means ({} for a complete checkpoint). CheckpointError for a
    damaged checkpoint or one that does not fit the graph."""
    try:
        with sess.graph.as_default():
            saver.restore(sess, prefix)
        return {}
    except (tf.errors.OpError, ValueError) as e:
        error = e
    later = _later_variables(sess.graph, prefix)
    if not later:
        raise restore_error(prefix, error)
    with sess.graph.as_default():
        sess.run([v.initializer for v in tf1.global_variables() if v.op.name in later])
    load_present(sess, prefix)
    return later


def load_present(sess, prefix: str):
    """Load every global variable of the session's graph that checkpoint ``prefix``
    holds, by name (the rest keeps its value); returns the checkpoint's reader."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        stored = reader.get_variable_to_shape_map()
        with sess.graph.as_default():
            for v in tf1.global_variables():
                if v.op.name in stored:
                    v.load(reader.get_tensor(v.op.name), sess)
    except (tf.errors.OpError, ValueError, IndexError) as e:
        raise restore_error(prefix, e) from None
    return reader


def _later_variables(graph, prefix: str) -> dict:
    """The global variables of ``graph`` that ``prefix`` lacks because a later version
    added them, with what their initial value means; {} when it lacks none or any other."""
    try:
        stored = {name for name, _ in tf.train.list_variables(prefix)}
    except (tf.errors.OpError, ValueError):
        return {}
    with graph.as_default():
        missing = {v.op.name for v in tf1.global_variables()} - stored
    if not missing or not missing <= LATER_VARIABLES.keys():
        return {}
    return {name: LATER_VARIABLES[name] for name in sorted(missing)}


def damage(prefix: str) -> Optional[str]:
    """Why the files of checkpoint ``prefix`` cannot be read in full (a data file cut
    short or overwritten), in a few words, or None when every tensor reads."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    # The reader raises whatever its C++ layer maps the failure to: IndexError for a
    # short read, DataLossError for a bad checksum, ValueError/OpError otherwise.
    except (tf.errors.OpError, ValueError, IndexError, RuntimeError, OSError) as e:
        return first_line(e)
    return None


def restore_error(prefix: str, error) -> CheckpointError:
    """The one-line error for a checkpoint that did not restore: damaged files (naming
    the intact earlier checkpoints of its folder), else a model it does not fit."""
    broken = damage(prefix)
    if broken is None:
        return CheckpointError(f"checkpoint {prefix} does not fit this model "
                               f"({first_line(error)}); was config.json edited?")
    folder = pathlib.Path(prefix).parent
    state = tf1.train.get_checkpoint_state(str(folder))
    earlier = [pathlib.Path(p).name for p in (state.all_model_checkpoint_paths if state else [])
               if pathlib.Path(p).name != pathlib.Path(prefix).name
               and pathlib.Path(str(p) + ".index").is_file() and damage(str(p)) is None]
    if earlier:
        advice = (f"the earlier checkpoint {earlier[-1]} is intact: to use it, write "
                  f"model_checkpoint_path: \"{earlier[-1]}\" in {folder / 'checkpoint'}")
    else:
        advice = "no intact earlier checkpoint is listed beside it"
    return CheckpointError(f"checkpoint {prefix} is damaged ({broken}): its files cannot be "
                           f"read in full; {advice}")


@contextlib.contextmanager
def run_lock(run_dir):
    """Hold an exclusive lock on the run folder for as long as a run trains in it."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(pathlib.Path(run_dir) / LOCK_FILE))
        except LockBusy:
            raise CheckpointError(f"run folder {run_dir} is in use by another training "
                                  "process; wait for it or choose another --name") from None
        yield


def is_leftover(name: str) -> bool:
    """Whether a run folder's entry ``name`` is what a start killed before config.json
    leaves behind: the lock file or a config.json temporary file (of this version,
    or ``.config.json.tmp-<pid>`` of earlier ones)."""
    return (name == LOCK_FILE or name.startswith(f".{CONFIG_FILE}.tmp-")
            or temp_pattern(CONFIG_FILE).match(name) is not None)
