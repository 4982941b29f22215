"""``resnet-graph launch-local``: a cluster of training processes on this machine.

Picks free loopback ports, starts one ``resnet-graph`` subprocess per task
with its ``TF_CONFIG`` (``worker:0`` is the chief), streams every line of
their stdout/stderr prefixed with the task name, and:

- when a task fails (non-zero status or a signal), stops the others: SIGTERM
  to each process group, SIGKILL after ``grace`` seconds;
- when the chief has exited, gives the others ``grace`` seconds to finish;
- forwards SIGINT/SIGTERM to every task (a second one kills them);
- returns the chief's status (128 + N if a signal N ended it).

GPUs: each task gets its own ``--devices`` GPUs through ``CUDA_VISIBLE_DEVICES``
(worker i the i-th group of the GPUs this process may use), said in the first
line; when there are fewer GPUs than tasks need it refuses, unless
``share_gpus`` gives every task all of them. Without GPUs the tasks train on
the CPU as before.

No TensorFlow here: the tasks import it.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import List, Optional, Sequence, TextIO

from .errors import UserError


def free_ports(n: int, host: str = "127.0.0.1") -> List[int]:
    """``n`` distinct ports that were free on ``host`` a moment ago."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_configs(workers: int, host: str = "127.0.0.1") -> List[dict]:
    """One TF_CONFIG per task of a ``workers``-task cluster on ``host``."""
    addresses = [f"{host}:{p}" for p in free_ports(workers, host)]
    return [{"cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}}
            for i in range(workers)]


# One folder per GPU the NVIDIA driver knows (no TensorFlow or CUDA library needed).
NVIDIA_GPUS_DIR = pathlib.Path("/proc/driver/nvidia/gpus")


def visible_gpus(environ=None) -> List[str]:
    """The GPUs a child process may use, as CUDA_VISIBLE_DEVICES entries: those of
    ``CUDA_VISIBLE_DEVICES`` when it is set (CUDA stops at the first invalid entry,
    e.g. -1; an empty value means none), else 0..n-1 for the n GPUs of the driver."""
    environ = os.environ if environ is None else environ
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        try:
            return [str(i) for i in range(len(list(NVIDIA_GPUS_DIR.iterdir())))]
        except OSError:
            return []
    ids = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry or entry.startswith("-"):
            break
        ids.append(entry)
    return ids


def devices_option(command: Sequence[str]) -> int:
    """The ``--devices N`` of a train command (1 when it is not given)."""
    for i, arg in enumerate(command):
        value = None
        if arg == "--devices" and i + 1 < len(command):
            value = command[i + 1]
        elif arg.startswith("--devices="):
            value = arg.split("=", 1)[1]
        if value is not None:
            try:
                return max(int(value), 1)
            except ValueError:
                return 1    # the task itself reports the usage error
    return 1


def gpu_plan(workers: int, per_worker: int, gpus: Sequence[str], share: bool = False):
    """(CUDA_VISIBLE_DEVICES of each task or None to leave it as it is, a note).

    Each task gets its own ``per_worker`` GPUs when there are enough; else a
    UserError, or with ``share`` every task gets all of them."""
    if not gpus:
        return [None] * workers, f"no GPU visible: {workers} task(s) on the CPU"
    needed = workers * per_worker
    if len(gpus) >= needed:
        plan = [",".join(gpus[i * per_worker:(i + 1) * per_worker]) for i in range(workers)]
        shown = ", ".join(f"worker:{i} CUDA_VISIBLE_DEVICES={v}" for i, v in enumerate(plan))
        return plan, f"each task on its own GPU(s): {shown}"
    if share and per_worker <= len(gpus):
        every = ",".join(gpus)
        return [every] * workers, (f"--share-gpus: all {workers} tasks share "
                                   f"CUDA_VISIBLE_DEVICES={every}")
    if share:
        raise UserError(f"--devices {per_worker} needs {per_worker} GPUs per task, but only "
                        f"{len(gpus)} are visible ({','.join(gpus)}); lower --devices")
    raise UserError(f"{workers} tasks with --devices {per_worker} need {needed} GPUs, but "
                    f"{len(gpus)} are visible ({','.join(gpus)}); lower --workers, or pass "
                    "--share-gpus to let the tasks share them")


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


class _Task:
    def __init__(self, name: str, argv: Sequence[str], env: dict):
        self.name = name
        self.process = subprocess.Popen(
            list(argv), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True, bufsize=1, text=True,
            errors="replace")
        self.threads = []

    def signal(self, number: int) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, number)
            except (ProcessLookupError, PermissionError):
                pass


def _pump(stream, prefix: str, out: TextIO, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            out.write(f"{prefix}{line if line.endswith(chr(10)) else line + chr(10)}")
            out.flush()
    stream.close()


def launch_local(command: Sequence[str], workers: int, *, grace: float = 15.0,
                 stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None,
                 python: Optional[str] = None, share_gpus: bool = False) -> int:
    """Run ``resnet-graph COMMAND...`` as ``workers`` tasks; return the chief's status.

    ``share_gpus``: when there are fewer GPUs than the tasks need, let them share
    (else refuse; see :func:`gpu_plan`)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if not command:
        raise UserError("give the command to run after '--', e.g. -- train original --epochs 2")
    gpus, gpu_note = gpu_plan(workers, devices_option(command), visible_gpus(), share_gpus)
    lock = threading.Lock()

    def note(text: str) -> None:
        with lock:
            stderr.write(f"[launch-local] {text}\n")
            stderr.flush()

    argv = [python or sys.executable, "-m", "resnet_graph.cli", *command]
    tasks: List[_Task] = []
    note(gpu_note)
    try:
        for config, cuda in zip(tf_configs(workers), gpus):
            env = dict(os.environ, TF_CONFIG=json.dumps(config), PYTHONUNBUFFERED="1")
            if cuda is not None:
                env["CUDA_VISIBLE_DEVICES"] = cuda
            name = f"worker:{config['task']['index']}"
            task = _Task(name, argv, env)
            tasks.append(task)
            address = config["cluster"]["worker"][config["task"]["index"]]
            note(f"{name} pid {task.process.pid} on {address}"
                 + (" (chief)" if not tasks[1:] else ""))
            for stream, out in ((task.process.stdout, stdout), (task.process.stderr, stderr)):
                thread = threading.Thread(target=_pump, args=(stream, f"[{name}] ", out, lock),
                                          daemon=True)
                thread.start()
                task.threads.append(thread)
    except OSError as e:
        for task in tasks:
            task.signal(signal.SIGKILL)
        raise UserError(f"cannot start {argv[0]} ({e.strerror})") from None

    signals_seen = []

    def forward(number, frame):
        signals_seen.append(number)
        for task in tasks:
            task.signal(number if len(signals_seen) == 1 else signal.SIGKILL)

    saved = {}
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            saved[number] = signal.signal(number, forward)
    try:
        kill_at = None          # when to SIGKILL whatever still runs
        while True:
            codes = [t.process.poll() for t in tasks]
            running = [t for t, c in zip(tasks, codes) if c is None]
            if not running:
                break
            # After a forwarded Ctrl-C/SIGTERM a task that stopped as asked (128 + N) has not
            # failed: the chief may still be writing the checkpoint (at an epoch's end, the
            # epoch's validation and row first), and a second signal would kill it mid-write.
            stopped = {0} | {128 + n for n in signals_seen}
            failed = [t for t, c in zip(tasks, codes)
                      if c is not None and _exit_status(c) not in stopped]
            now = time.monotonic()
            if kill_at is None and failed:
                if not signals_seen:
                    note(f"{failed[0].name} exited with status {_exit_status(failed[0].process.returncode)}"
                         f"; stopping the other tasks")
                for t in running:
                    t.signal(signal.SIGTERM)
                kill_at = now + grace
            elif kill_at is None and codes[0] is not None:
                kill_at = now + grace   # the chief is done: the others have grace seconds
            elif kill_at is not None and now > kill_at:
                for t in running:
                    note(f"{t.name} did not stop within {grace:.0f} s; killing it")
                    t.signal(signal.SIGKILL)
                kill_at = now + 3600
            time.sleep(0.1)
        for task in tasks:
            for thread in task.threads:
                thread.join(timeout=5)
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)
        for task in tasks:       # never leave a task behind (e.g. on an exception here)
            task.signal(signal.SIGKILL)
    return _exit_status(tasks[0].process.returncode)
