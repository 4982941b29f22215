"""Kill a real training run with SIGKILL again and again; check that nothing is lost.

    .venv/bin/python tests/torture.py --kills 10 --seed 0 --work /tmp/torture
    .venv/bin/python tests/torture.py --kills 100 --seed 1 --work /tmp/torture --json-out t.json

What it does:

1. writes a small synthetic CIFAR-10 folder (``write_synthetic_cifar`` of tests/synthetic.py);
2. trains the reference: one uninterrupted run (``<work>/straight``) of
   ``resnet-graph train original --depth 8 --batch-size 50 --valid-size 50 --epochs E``;
3. trains the same run again in ``<work>/killed`` and sends it SIGKILL ``--kills`` times,
   each time restarting it with ``--resume`` (or, when the kill came before config.json
   existed, without it, as the error message of ``--resume`` says). The moment of each
   kill is drawn at random from several kinds: a random delay after the start; the
   creation of a checkpoint temp file (``*.tempstate*``, ``checkpoint.tmp*``, in the run
   folder or in ``best/``); the creation of a history temp file (``.histories.h5.*.tmp``);
   the moment the history file was replaced (an epoch's row written, its checkpoint not
   yet); a random moment inside the steps of an epoch. File events come from inotify, so
   the kill follows the event within a fraction of a millisecond of this process waking;
4. after every kill checks the files as they lie (the history reads and has rows 1..k,
   every checkpoint the state file names exists, the history is at most one row ahead of
   the checkpoint, config.json and best.json parse) and notes where the kill landed from
   what it left (temp files, checkpoint files not yet named in the state file);
5. lets the last resume finish and verifies: exit code 0, one history row per epoch
   1..E, every named checkpoint file present (files lost = 0), ``resnet-graph eval
   --ckpt ... --json`` restores the latest checkpoint, and the result equals the
   uninterrupted run (see :func:`compare`).

Prints a summary, writes it as JSON with ``--json-out``, exits 1 on any violation.
Every process is a child of this one (run the script under ``nice`` to spare the
machine); it kills only the training processes it started.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import pathlib
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import Counter

import numpy as np

from resnet_graph import fetch, history

# The synthetic data set is test tooling (tests/synthetic.py, beside this file), not part
# of the package; run as a script, this folder is already first on sys.path.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from synthetic import write_synthetic_cifar  # noqa: E402

MODEL, DEPTH, BATCH, VALID = "original", 8, 50, 50
NAME = f"{MODEL}-{DEPTH}"
COMPARED_COLUMNS = ("epoch", "train_loss", "train_acc", "valid_loss", "valid_acc", "lr")

# inotify (linux/inotify.h)
IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x8, 0x80, 0x100
_EVENT = struct.Struct("iIII")

# What a kill can leave behind, and what it tells about where the kill landed.
RESIDUE = [
    ("checkpoint data/index write", re.compile(r"model\.ckpt-\d+\.(data|index).*\.tempstate\d+\Z")),
    ("checkpoint state-file write", re.compile(r"checkpoint\.tmp[0-9a-f]+\Z")),
    ("history write", re.compile(r"\.histories\.h5\.[0-9a-f]{16}\.tmp\Z")),
    ("config.json/best.json write", re.compile(r"\.(config|best)\.json\.tmp-\d+\Z")),
]


class Inotify:
    """Creation and rename events in a few folders, read without blocking."""

    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.folders: dict[int, pathlib.Path] = {}

    def watch(self, folder: pathlib.Path) -> None:
        if folder in self.folders.values() or not folder.is_dir():
            return
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder),
                                         IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE)
        if wd >= 0:
            self.folders[wd] = folder

    def events(self, timeout: float) -> list[tuple[pathlib.Path, int, str]]:
        """(folder, mask, name) of the events that arrive within ``timeout`` seconds."""
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0.0))
        if not ready:
            return []
        try:
            buf = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        out, i = [], 0
        while i < len(buf):
            wd, mask, _, length = _EVENT.unpack_from(buf, i)
            name = buf[i + _EVENT.size:i + _EVENT.size + length].rstrip(b"\0").decode()
            i += _EVENT.size + length
            if wd in self.folders:
                out.append((self.folders[wd], mask, name))
        return out

    def close(self) -> None:
        os.close(self.fd)


# ---------------------------------------------------------------------------- runs
def executable() -> str:
    """The ``resnet-graph`` console script next to this interpreter."""
    exe = pathlib.Path(sys.executable).with_name("resnet-graph")
    if not exe.exists():
        raise SystemExit(f"{exe} not found: run with the project's virtualenv python")
    return str(exe)


def train_args(data_dir, out, epochs: int, seed: int, resume: bool) -> list[str]:
    args = [executable(), "train", MODEL, "--depth", str(DEPTH), "--batch-size", str(BATCH),
            "--valid-size", str(VALID), "--augment", "--epochs", str(epochs), "--seed", str(seed),
            "--data-dir", str(data_dir), "--out", str(out), "--quiet"]
    return args + ["--resume"] if resume else args


def child_env() -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop(fetch.ENV_DATA_DIR, None)
    return env


def steps_per_epoch(n_per_batch: int) -> int:
    return (5 * n_per_batch - VALID) // BATCH


# ---------------------------------------------------------------------------- checks
def checkpoint_state(folder: pathlib.Path) -> tuple[str | None, list[str]]:
    """(latest prefix, all prefixes) named in ``folder/checkpoint``, as in the text proto."""
    path = folder / "checkpoint"
    if not path.exists():
        return None, []
    text = path.read_text()
    latest = re.search(r'^model_checkpoint_path: "(.*)"$', text, re.M)
    every = re.findall(r'^all_model_checkpoint_paths: "(.*)"$', text, re.M)
    if latest is None:
        raise ValueError(f"{path} names no model_checkpoint_path")
    return latest.group(1), every


def missing_checkpoint_files(folder: pathlib.Path) -> list[str]:
    """Files of the checkpoints named in ``folder/checkpoint`` that are not there."""
    latest, every = checkpoint_state(folder)
    missing = []
    for prefix in dict.fromkeys(([latest] if latest else []) + every):
        for suffix in (".index", ".data-00000-of-00001"):
            if not (folder / (prefix + suffix)).is_file():
                missing.append(str(folder / (prefix + suffix)))
    return missing


def step_of(prefix: str | None) -> int:
    return int(prefix.rsplit("-", 1)[1]) if prefix else 0


def check_files(out: pathlib.Path, spe: int) -> tuple[list[str], dict]:
    """Invariants that hold at every moment (after any kill). Returns (violations, facts)."""
    run_dir, hist = out / NAME, out / "histories.h5"
    bad: list[str] = []
    facts = {"rows": 0, "ckpt_step": 0, "lost": 0}
    if (run_dir / "config.json").exists():
        try:
            json.loads((run_dir / "config.json").read_text())
        except ValueError as e:
            bad.append(f"config.json does not parse: {e}")
    rows = 0
    if hist.exists():
        try:
            epochs = (list(history.read_run(hist, NAME).columns["epoch"])
                      if history.has_run(hist, NAME) else [])
            rows = len(epochs)
            if epochs != list(range(1, rows + 1)):
                bad.append(f"history epochs are {epochs}, not 1..{rows}")
        except Exception as e:  # noqa: BLE001 - any failure to read is a violation
            bad.append(f"history unreadable: {e}")
    for folder in (run_dir, run_dir / "best"):
        try:
            missing = missing_checkpoint_files(folder)
        except (OSError, ValueError) as e:
            bad.append(f"checkpoint state in {folder} unreadable: {e}")
            continue
        facts["lost"] += len(missing)
        bad += [f"named checkpoint file missing: {m}" for m in missing]
    best_json = run_dir / "best" / "best.json"
    if best_json.exists():
        try:
            json.loads(best_json.read_text())
        except ValueError as e:
            bad.append(f"best.json does not parse: {e}")
    try:
        step = step_of(checkpoint_state(run_dir)[0])
    except (OSError, ValueError):
        step = 0
    # Only end-of-epoch checkpoints (SIGKILL cannot trigger the SIGINT/SIGTERM one).
    if step % spe:
        bad.append(f"latest checkpoint at step {step}, not at the end of an epoch")
    # The row of an epoch is written before its checkpoint: at most one row ahead.
    if not 0 <= rows - step // spe <= 1:
        bad.append(f"history has {rows} rows but the checkpoint is after epoch {step // spe}")
    facts.update(rows=rows, ckpt_step=step)
    return bad, facts


def residue(out: pathlib.Path) -> list[tuple[str, str]]:
    """(kind, path) of every temp file or unnamed checkpoint under ``out``."""
    found = []
    run_dir = out / NAME
    for folder in (out, run_dir, run_dir / "best"):
        if not folder.is_dir():
            continue
        named: set[str] = set()
        try:
            latest, every = checkpoint_state(folder)
            named = set(every) | ({latest} if latest else set())
        except (OSError, ValueError):
            pass
        newest = max((step_of(n) for n in named), default=-1)
        for entry in sorted(os.listdir(folder)):
            for kind, pattern in RESIDUE:
                if pattern.match(entry):
                    found.append((kind, str(folder / entry)))
            m = re.match(r"(model\.ckpt-\d+)\.index\Z", entry)
            if m and m.group(1) not in named and folder != out:
                # Newer than the state file's latest: written, the state file not yet
                # updated. Older: a checkpoint that the Saver of an earlier process
                # wrote and that no later Saver knows of, so none deletes it.
                kind = ("checkpoint written, not yet named" if step_of(m.group(1)) > newest
                        else "older checkpoint not deleted")
                found += [(kind, str(f)) for f in sorted(folder.glob(m.group(1) + ".*"))
                          if ".tempstate" not in f.name]
    return found


AFTER_ROW = "history row written, checkpoint not yet"


def landed(before_first_write: bool, left: list[tuple[str, str]], row_ahead: bool) -> str:
    """Where a kill landed, from what it left behind (``left``: new residue only;
    ``row_ahead``: the history holds a row newer than the latest checkpoint)."""
    kinds = {k for k, _ in left}
    for kind in [k for k, _ in RESIDUE] + ["checkpoint written, not yet named"]:
        if kind in kinds:
            return kind
    if before_first_write:
        return "startup (before any write)"
    return AFTER_ROW if row_ahead else "steps/evaluation/between writes"


# ---------------------------------------------------------------------------- kill plans
KINDS = ("random", "steps", "checkpoint", "best", "history", "history-replaced")


def plan_kill(rng: random.Random, allowed_epochs: float, startup: float, epoch_s: float,
              left_epochs: int, startup_writes: tuple[int, int]) -> dict:
    """Choose when to kill the next process.

    ``allowed_epochs``: how many epochs this process may finish before the kill, so that
    the run keeps epochs for the remaining kills; ``left_epochs``: epochs not yet
    checkpointed; ``startup_writes``: (history temp files, history replacements) the
    process makes before its first epoch.
    """
    if left_epochs <= 1:   # the last epoch: kill before it could finish
        return {"kind": "random", "delay": rng.uniform(0, startup), "limit": 1}
    kind = rng.choice(KINDS)
    k_max = max(1, min(int(allowed_epochs) + 1, left_epochs - 1))
    # limit: kill right after the k_max-th checkpoint whatever the plan (e.g. a `best`
    # plan when the validation accuracy no longer improves and best/ is not written).
    plan = {"kind": kind, "limit": k_max, "delay": 0.0}
    if kind == "random":
        plan["delay"] = rng.uniform(0, startup + min(allowed_epochs + 0.5, 3) * epoch_s)
    elif kind == "steps":
        # Into the steps of the first epoch, or of the one after the n-th checkpoint.
        plan.update(after_checkpoints=rng.randint(0, k_max - 1), delay=rng.uniform(0, epoch_s))
    elif kind in ("checkpoint", "best"):
        # The n-th creation of a checkpoint temp file in the run folder (three per save:
        # data, index, state file) or in best/; sometimes a few ms later, to spread the
        # kills over the phases of a save.
        plan.update(nth=rng.randint(1, 3 * k_max),
                    delay=rng.choice([0.0, 0.0, rng.uniform(0, 0.02)]))
    elif kind == "history":
        # The n-th history temp file: the start's writes (create_run, or a resume's
        # truncate and set_attrs), then one per epoch.
        plan.update(nth=rng.randint(1, startup_writes[0] + k_max - 1) if k_max > 1
                    else rng.randint(1, startup_writes[0] + 1),
                    delay=rng.choice([0.0, rng.uniform(0, 0.01)]))
    else:  # history-replaced: an epoch's row is in the history, its checkpoint not yet
        plan["nth"] = startup_writes[1] + rng.randint(1, k_max)
    return plan


class Trigger:
    """Feeds file events and time to a plan; says when to kill.

    Whatever the plan, the process is killed at the latest right after its
    ``plan["limit"]``-th checkpoint, so that it cannot finish while kills remain."""

    def __init__(self, plan: dict, run_dir: pathlib.Path, started: float):
        self.plan, self.run_dir, self.started = plan, run_dir, started
        self.count = 0
        self.checkpoints = 0
        self.fallback = False
        self.fire_at: float | None = None
        self.first_write: float | None = None
        if plan["kind"] == "random":
            self.fire_at = started + plan["delay"]

    def feed(self, folder: pathlib.Path, mask: int, name: str, now: float) -> None:
        kind = self.plan["kind"]
        created = bool(mask & IN_CREATE)
        if created and self.first_write is None and any(p.match(name) for _, p in RESIDUE):
            self.first_write = now
        saved = bool(mask & IN_MOVED_TO) and folder == self.run_dir and name == "checkpoint"
        self.checkpoints += saved
        if self.fire_at is not None:
            return
        if saved and self.checkpoints >= self.plan["limit"]:
            self.fire_at, self.fallback = now, True
            return
        hit = False
        if kind == "checkpoint":
            hit = created and folder == self.run_dir and (
                ".tempstate" in name or name.startswith("checkpoint.tmp"))
        elif kind == "best":
            hit = created and folder == self.run_dir / "best" and (
                ".tempstate" in name or name.startswith(("checkpoint.tmp", ".best.json.tmp")))
        elif kind == "history":
            hit = created and name.startswith(".histories.h5.")
        elif kind == "history-replaced":
            hit = bool(mask & IN_MOVED_TO) and name == "histories.h5"
        elif kind == "steps":
            if self.plan["after_checkpoints"] == 0:
                # Armed by the start's last history write (training begins right after).
                if bool(mask & IN_MOVED_TO) and name == "histories.h5" and not self.count:
                    self.count = 1
                    self.fire_at = now + 0.2 + self.plan["delay"]
            elif saved and self.checkpoints >= self.plan["after_checkpoints"]:
                self.fire_at = now + self.plan["delay"]
            return
        if hit:
            self.count += 1
            if self.count >= self.plan["nth"]:
                self.fire_at = now + self.plan["delay"]

    def due(self, now: float) -> bool:
        return self.fire_at is not None and now >= self.fire_at


# ---------------------------------------------------------------------------- the torture
def run_reference(data_dir, work: pathlib.Path, epochs: int, seed: int, timeout: float) -> dict:
    out = work / "straight"
    start = time.monotonic()
    proc = subprocess.run(train_args(data_dir, out, epochs, seed, resume=False),
                          capture_output=True, text=True, env=child_env(), timeout=timeout)
    wall = time.monotonic() - start
    if proc.returncode:
        raise SystemExit(f"the uninterrupted run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    run = history.read_run(out / "histories.h5", NAME)
    train_s = float(np.sum(run.columns["seconds"]))
    return {"out": out, "wall": wall, "epoch_s": train_s / epochs,
            "startup": max(1.0, wall - train_s)}


def torture(kills: int, seed: int, work, *, epochs: int | None = None, n_per_batch: int = 100,
            timeout: float = 600.0, cli_eval: bool = True, log=print) -> dict:
    """Run the whole torture; returns the summary (``violations`` empty when all held)."""
    work = pathlib.Path(work).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t_begin = time.monotonic()
    rng = random.Random(seed)
    epochs = epochs or max(4, (kills * 2 + 2) // 3)
    spe = steps_per_epoch(n_per_batch)
    data_dir = write_synthetic_cifar(work / "cifar", n_train_per_batch=n_per_batch,
                                          n_test=100, seed=seed)
    log(f"reference: {epochs} epochs x {spe} steps, uninterrupted ...")
    ref = run_reference(data_dir, work, epochs, seed, timeout)
    log(f"reference: {ref['wall']:.1f}s (startup ~{ref['startup']:.1f}s, "
        f"{ref['epoch_s']:.2f}s per epoch)")

    out = work / "killed"
    run_dir = out / NAME
    run_dir.mkdir(parents=True)        # empty, so that it can be watched from the start
    ino = Inotify()
    for folder in (out, run_dir):
        ino.watch(folder)
    violations: list[str] = []
    records: list[dict] = []
    startups: list[float] = []
    launches = Counter()
    final_rc, final_err = None, ""
    while True:
        killing = len(records) < kills
        resume = (run_dir / "config.json").exists()
        launches["--resume" if resume else "new start"] += 1
        ino.watch(run_dir / "best")
        _, facts = check_files(out, spe)
        done = facts["ckpt_step"] // spe
        ahead = facts["rows"] - done
        if not resume:
            writes = (1, 1)                          # create_run
        elif facts["ckpt_step"]:
            writes = (2, 1 + ahead)                  # truncate (+ a row dropped), set_attrs
        else:
            writes = (1 + ahead, 1 + ahead)          # create_run(exist_ok), truncate
        allowed = (epochs - 1 - done) / max(kills - len(records), 1)
        startup = float(np.median(startups)) if startups else ref["startup"]
        plan = (plan_kill(rng, allowed, startup, ref["epoch_s"], epochs - done, writes)
                if killing else None)
        residue_before = set(residue(out))
        err_path = work / f"stderr-{sum(launches.values()):03d}.txt"
        with open(err_path, "w") as err:
            started = time.monotonic()
            proc = subprocess.Popen(train_args(data_dir, out, epochs, seed, resume),
                                    stdout=subprocess.DEVNULL, stderr=err, env=child_env())
        trigger = Trigger(plan, run_dir, started) if plan else None
        killed_at = None
        while proc.poll() is None:
            now = time.monotonic()
            if now - started > timeout:
                proc.kill()
                violations.append(f"a training process ran longer than {timeout:.0f}s")
                break
            wait = 0.05
            if trigger and trigger.fire_at is not None:
                wait = min(wait, max(trigger.fire_at - now, 0.0))
            for folder, mask, name in ino.events(wait):
                now = time.monotonic()
                if folder == run_dir and name == "best":
                    ino.watch(run_dir / "best")
                if trigger:
                    trigger.feed(folder, mask, name, now)
            if trigger and trigger.due(time.monotonic()):
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = time.monotonic() - started
                break
        rc = proc.wait()
        ino.events(0)   # drain
        stderr_text = err_path.read_text(errors="replace")
        if trigger and trigger.first_write is not None:
            startups.append(trigger.first_write - started)
        if killed_at is None:
            final_rc, final_err = rc, stderr_text
            if rc != 0:
                violations.append(f"training exited with {rc}: {stderr_text.strip()[-500:]}")
            break
        if rc != -signal.SIGKILL:
            violations.append(f"kill {len(records) + 1}: exit code {rc}, not SIGKILL")
        left = [r for r in residue(out) if r not in residue_before]
        rows_before = facts["rows"]
        bad, facts = check_files(out, spe)
        before_first_write = trigger.first_write is None or (
            started + killed_at < trigger.first_write)
        where = landed(before_first_write, left, facts["rows"] > facts["ckpt_step"] // spe)
        kind = plan["kind"] + (" (fallback)" if trigger.fallback else "")
        rec = {"kill": len(records) + 1, "plan": kind, "seconds": round(killed_at, 3),
               "landed": where, "resumed": resume, "rows": facts["rows"],
               "ckpt_step": facts["ckpt_step"],
               "row_ahead": facts["rows"] - facts["ckpt_step"] // spe,
               "rows_before": rows_before}
        records.append(rec)
        violations += [f"after kill {rec['kill']} ({where}): {b}" for b in bad]
        log(f"kill {rec['kill']:3d}/{kills}: {kind:<27} at {killed_at:6.2f}s -> "
            f"{where}; checkpoint after epoch {facts['ckpt_step'] // spe}, "
            f"{facts['rows']} history rows")
    ino.close()
    if len(records) < kills:
        violations.append(f"the run finished after {len(records)} kills, before {kills}; "
                          "raise --epochs")

    # -- final verification ------------------------------------------------------------
    result = verify(out, ref["out"], epochs, spe, timeout, cli_eval)
    violations += result.pop("violations")
    garbage = residue(out)
    hist_temps = [p for k, p in garbage if k == "history write"]
    if hist_temps:
        violations.append(f"history temp files left after the run: {hist_temps}")
    summary = {
        "kills_requested": kills, "kills": len(records), "seed": seed, "epochs": epochs,
        "steps_per_epoch": spe, "work": str(work),
        "landed": dict(Counter(r["landed"] for r in records)),
        "planned": dict(Counter(r["plan"] for r in records)),
        "resumes": launches["--resume"], "new_starts": launches["new start"],
        "kills_with_history_row_ahead": sum(1 for r in records if r["row_ahead"] == 1),
        "final_exit_code": final_rc,
        "leftover_files": dict(Counter(k for k, _ in garbage)),
        "leftover_bytes": sum(os.path.getsize(p) for _, p in garbage if os.path.exists(p)),
        **result,
        "reference_seconds": round(ref["wall"], 1),
        "seconds": round(time.monotonic() - t_begin, 1),
        "kill_log": records,
        "violations": violations,
    }
    if final_rc not in (0, None) and final_err:
        summary["final_stderr"] = final_err[-2000:]
    return summary


def verify(out: pathlib.Path, ref_out: pathlib.Path, epochs: int, spe: int,
           timeout: float, cli_eval: bool = True) -> dict:
    """The finished run against the rules and against the uninterrupted run."""
    bad, facts = check_files(out, spe)
    res: dict = {"violations": list(bad), "files_lost": facts["lost"], "rows": facts["rows"]}
    hist = out / "histories.h5"
    try:
        run = history.read_run(hist, NAME)
        ref = history.read_run(ref_out / "histories.h5", NAME)
    except Exception as e:  # noqa: BLE001
        res["violations"].append(f"history unreadable: {e}")
        return res
    epochs_col = [int(e) for e in run.columns["epoch"]]
    if epochs_col != list(range(1, epochs + 1)):
        res["violations"].append(f"history epochs {epochs_col}, want exactly 1..{epochs}")
    for key in ("test_acc", "test_loss", "best_epoch"):
        if key not in run.attrs:
            res["violations"].append(f"history lacks attribute {key}")
    if run.attrs.get("status") == "failed":
        res["violations"].append(f"history marks the run failed: {run.attrs.get('failure')}")
    try:
        best = json.loads((out / NAME / "best" / "best.json").read_text())
    except (OSError, ValueError) as e:
        best = {"epoch": f"unreadable ({e})"}
    if best["epoch"] != run.attrs.get("best_epoch"):
        res["violations"].append(f"best/best.json names epoch {best['epoch']}, the history "
                                 f"best_epoch {run.attrs.get('best_epoch')}")

    # The latest checkpoint restores: through the command line in a new process, and
    # in this process (the function `eval --ckpt` calls) for both runs, which must agree.
    if cli_eval:
        proc = subprocess.run([executable(), "eval", "--ckpt", str(out / NAME), "--json"],
                              capture_output=True, text=True, env=child_env(), timeout=timeout)
        if proc.returncode:
            res["violations"].append(f"eval --ckpt failed ({proc.returncode}): "
                                     f"{proc.stderr[-500:]}")
        else:
            ev = json.loads(proc.stdout)
            res["cli_eval"] = {"accuracy": ev["accuracy"], "loss": ev["loss"]}
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from resnet_graph.evaluate import evaluate_run
    for label, best in (("latest", False), ("best", True)):
        mine, theirs = (evaluate_run(d / NAME, best=best) for d in (out, ref_out))
        res[f"eval_{label}"] = {"accuracy": mine.accuracy, "loss": mine.loss}
        if (mine.accuracy, mine.loss) != (theirs.accuracy, theirs.loss):
            res["violations"].append(
                f"eval of the {label} checkpoint: accuracy {mine.accuracy} loss {mine.loss}, "
                f"the uninterrupted run's {theirs.accuracy} {theirs.loss}")
    if cli_eval and "cli_eval" in res and res["cli_eval"] != res["eval_latest"]:
        res["violations"].append(f"eval --ckpt gave {res['cli_eval']}, in-process "
                                 f"{res['eval_latest']}")

    # Against the uninterrupted run. Everything the run computes is a function of
    # (seed, epoch, global_step) and of the restored float32 state: the data order
    # (epoch_order), the stateless augmentation, the initialisation (only in the first
    # process, never redone after a checkpoint exists); a SIGKILL only throws away steps
    # since the last end-of-epoch checkpoint, which are redone on the same inputs from
    # the same restored bits. On this CPU with a fixed thread count the kernels are
    # deterministic (two uninterrupted runs give identical bits), so the strongest
    # property holds and is what is asserted: every variable of the final and of the
    # best checkpoint is bitwise equal, and so are the history's metric columns and test
    # metrics. Wall-clock columns (seconds, train_seconds, images_per_sec) are not compared.
    diff_cols = [c for c in COMPARED_COLUMNS
                 if not np.array_equal(run.columns[c], ref.columns[c])]
    if diff_cols:
        res["violations"].append(f"history columns differ from the uninterrupted run: "
                                 f"{diff_cols}")
    for key in ("test_acc", "test_loss", "best_epoch", "best_valid_acc"):
        if run.attrs.get(key) != ref.attrs.get(key):
            res["violations"].append(f"attribute {key} {run.attrs.get(key)!r} differs from "
                                     f"the uninterrupted run's {ref.attrs.get(key)!r}")
    res["history_equal"] = not diff_cols
    for label, sub in (("final", ""), ("best", "best")):
        cmp = compare_checkpoints(out / NAME / sub, ref_out / NAME / sub)
        res[f"{label}_weights"] = cmp
        if not cmp["bitwise_equal"]:
            res["violations"].append(f"{label} checkpoint differs from the uninterrupted run: "
                                     f"{cmp}")
    return res


def compare_checkpoints(a_dir: pathlib.Path, b_dir: pathlib.Path) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # only here: the torture itself does not need TensorFlow
    a_prefix, b_prefix = tf.train.latest_checkpoint(str(a_dir)), tf.train.latest_checkpoint(
        str(b_dir))
    a, b = tf.train.load_checkpoint(a_prefix), tf.train.load_checkpoint(b_prefix)
    names_a, names_b = set(a.get_variable_to_shape_map()), set(b.get_variable_to_shape_map())
    common = sorted(names_a & names_b)
    equal, max_abs = 0, 0.0
    for n in common:
        x, y = a.get_tensor(n), b.get_tensor(n)
        if np.array_equal(x, y):
            equal += 1
        elif np.asarray(x).dtype.kind in "fiu":
            max_abs = max(max_abs, float(np.max(np.abs(np.asarray(x, np.float64)
                                                      - np.asarray(y, np.float64)))))
        else:
            max_abs = float("inf")
    step = [int(c.get_tensor("global_step")) if "global_step" in names_a | names_b and
            c.has_tensor("global_step") else None for c in (a, b)]
    return {"checkpoint": pathlib.Path(a_prefix).name,
            "reference": pathlib.Path(b_prefix).name, "variables": len(common),
            "bitwise_equal": equal == len(common) and names_a == names_b,
            "equal_variables": equal, "max_abs_diff": max_abs, "global_step": step}


def print_summary(s: dict) -> None:
    print()
    print(f"kills sent: {s['kills']} (asked {s['kills_requested']}), seed {s['seed']}, "
          f"{s['epochs']} epochs x {s['steps_per_epoch']} steps")
    print("where they landed:")
    for where, n in sorted(s["landed"].items(), key=lambda kv: -kv[1]):
        print(f"  {n:4d}  {where}")
    print(f"kills with the history one row ahead of the checkpoint: "
          f"{s['kills_with_history_row_ahead']}")
    print(f"restarts: {s['resumes']} with --resume, {s['new_starts']} new starts "
          f"(incl. the first)")
    print(f"history rows: {s.get('rows')} (epochs 1..{s['epochs']}), files lost: "
          f"{s.get('files_lost')}")
    print(f"left behind (harmless, never read): {s['leftover_files'] or 'nothing'} "
          f"({s['leftover_bytes']} bytes)")
    for label in ("final", "best"):
        w = s.get(f"{label}_weights")
        if w:
            print(f"{label} checkpoint {w['checkpoint']} vs reference {w['reference']}: "
                  f"{w['equal_variables']}/{w['variables']} variables bitwise equal, "
                  f"max |diff| {w['max_abs_diff']:.3g}, global_step {w['global_step']}")
    print(f"history metrics equal to the uninterrupted run: {s.get('history_equal')}; "
          f"eval of the latest checkpoint: {s.get('cli_eval') or s.get('eval_latest')}")
    print(f"time: {s['seconds']}s (uninterrupted run {s['reference_seconds']}s)")
    if s["violations"]:
        print(f"VIOLATIONS ({len(s['violations'])}):")
        for v in s["violations"]:
            print(f"  - {v}")
    else:
        print("no violations")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs to send [10]")
    p.add_argument("--seed", type=int, default=0, help="seed of the run and of the kill plan")
    p.add_argument("--work", type=pathlib.Path, required=True,
                   help="scratch folder (emptied first)")
    p.add_argument("--epochs", type=int, help="epochs of the run [about 2/3 of --kills, >= 4]")
    p.add_argument("--images-per-batch", type=int, default=100,
                   help="synthetic training images per data_batch file [100]")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds one training process may take [600]")
    p.add_argument("--json-out", type=pathlib.Path, help="write the summary as JSON here")
    p.add_argument("--no-cli-eval", dest="cli_eval", action="store_false",
                   help="restore the final checkpoint in this process only, not also "
                        "through `resnet-graph eval --ckpt ... --json` (saves a start)")
    args = p.parse_args(argv)
    if args.kills < 0 or (args.epochs is not None and args.epochs < 2):
        p.error("--kills must be >= 0 and --epochs >= 2")
    if (5 * args.images_per_batch - VALID) // BATCH < 1:
        p.error("--images-per-batch too small for one batch")
    summary = torture(args.kills, args.seed, args.work, epochs=args.epochs,
                      n_per_batch=args.images_per_batch, timeout=args.timeout,
                      cli_eval=args.cli_eval)
    print_summary(summary)
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
