"""Synchronous data-parallel training over several processes (docs/distributed.md).

The cluster comes from ``TF_CONFIG`` (or ``train --cluster FILE``), the usual
JSON: ``{"cluster": {"chief": ["host:port"], "worker": ["host:port", ...]},
"task": {"type": "worker", "index": 0}}``. The chief (``chief:0``, else
``worker:0``) is rank 0, the workers follow in order.

Mechanism: every process runs a ``tf.distribute.Server`` and its own copy of
the single-process graph (variables included), built for its rank: it reads
rows ``rank * b:(rank + 1) * b`` (b = global batch / workers) of every global
batch of ``inputs.epoch_order``, so the workers read disjoint shards of each
epoch and together exactly the batches of a single-process run. A step
packs the (tower-averaged) gradients, the loss and accuracy, the batch-norm
statistics deltas and a stop flag into one vector, averages it over all
processes with one ``CollectiveReduceV2`` (TensorFlow's collective runtime,
ring all-reduce over gRPC, with a timeout), and applies the average; every
replica applies the same update to the same weights, so the model stays
identical everywhere and only the chief needs to save it. At the start the
chief's variables (fresh or restored) are broadcast to all (one all-reduce
where the others contribute zeros), with a fingerprint of each task's
configuration. No parameter servers, no ``SyncReplicasOptimizer``, no
``MonitoredTrainingSession``.

Shutdown: every task runs the same number of steps, so they finish together;
a final all-reduce (a barrier) is followed by a short linger before a worker
exits, so that the chief's last transfers complete. A stop (Ctrl-C/SIGTERM on
any task) is carried by the stop flag: all tasks stop after the same step and
the chief writes the checkpoint. A task that dies makes the others' next
all-reduce fail after ``worker_timeout`` seconds (``startup_timeout`` for the
first one); they exit with one ``Error:`` line, and the chief's last checkpoint
is what ``--resume`` continues from. A watchdog ends a task that stays blocked
past its timeout by more than a margin (some gRPC retries ignore the timeout).
"""

import dataclasses
import json
import os
import pathlib
import signal
import sys
import threading
import time
import zlib
from typing import Dict, List, Optional, Tuple

import tensorflow as tf

from .errors import TrainingInterrupted, UserError, first_line
from .replicate import build_replicated_graph
from .train import Trainer, TrainingError

tf1 = tf.compat.v1

TF_CONFIG = "TF_CONFIG"
GROUP_KEY = 1
STEP_KEY, SYNC_KEY, BARRIER_KEY = 1, 2, 3     # instance keys of the three collectives
WATCHDOG_MARGIN = 30.0    # seconds past a collective's own timeout before the watchdog acts
LINGER_SECONDS = 2.0      # a worker keeps its server up this long after the final barrier
DEFAULT_WORKER_TIMEOUT = 120.0
DEFAULT_STARTUP_TIMEOUT = 600.0


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The processes of one run and which of them this one is."""

    jobs: Dict[str, Tuple[str, ...]]    # job name -> addresses ("host:port")
    task_type: str
    task_index: int
    worker_timeout: float = DEFAULT_WORKER_TIMEOUT
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT

    @property
    def tasks(self) -> List[Tuple[str, int]]:
        """The training tasks in rank order: the chief, then the workers."""
        return ([("chief", i) for i in range(len(self.jobs.get("chief", ())))]
                + [("worker", i) for i in range(len(self.jobs.get("worker", ())))])

    @property
    def rank(self) -> int:
        return self.tasks.index((self.task_type, self.task_index))

    @property
    def workers(self) -> int:
        """Processes that train (the chief included)."""
        return len(self.tasks)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def name(self) -> str:
        return f"{self.task_type}:{self.task_index}"

    @property
    def device_prefix(self) -> str:
        return f"/job:{self.task_type}/replica:0/task:{self.task_index}"

    @property
    def leader(self) -> str:
        job, index = self.tasks[0]
        return f"/job:{job}/replica:0/task:{index}"

    def spec(self):
        return tf1.train.ClusterSpec({job: list(addresses) for job, addresses in self.jobs.items()})


def parse_cluster(config, source: str = TF_CONFIG, **timeouts) -> Cluster:
    """A :class:`Cluster` from TF_CONFIG's JSON (text or dict); UserError if malformed."""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError as e:
            raise UserError(f"{source} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise UserError(f"{source} needs a 'cluster' object: "
                        '{"cluster": {"worker": ["host:port", ...]}, "task": {...}}')
    jobs = {}
    for job, addresses in config["cluster"].items():
        if isinstance(addresses, dict):     # the sparse form {"0": "host:port"}
            addresses = [addresses[k] for k in sorted(addresses, key=int)]
        if not isinstance(addresses, list) or not all(
                isinstance(a, str) and ":" in a for a in addresses):
            raise UserError(f"{source}: cluster job {job!r} must be a list of 'host:port'")
        jobs[job] = tuple(addresses)
    unused = sorted(set(jobs) - {"chief", "worker"})
    if unused:
        raise UserError(f"{source}: job(s) {', '.join(unused)} are not used: training averages "
                        "gradients with collective all-reduce among 'chief' and 'worker' tasks, "
                        "without parameter servers; remove them")
    if len(jobs.get("chief", ())) > 1:
        raise UserError(f"{source}: there can be only one chief")
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task:
        raise UserError(f"{source} needs a 'task' object: {{\"type\": \"worker\", \"index\": 0}}")
    try:
        task_type, task_index = str(task["type"]), int(task.get("index", 0))
    except (TypeError, ValueError):
        raise UserError(f"{source}: task index must be an integer") from None
    if task_type not in ("chief", "worker"):
        raise UserError(f"{source}: task type {task_type!r} does not train; use chief or worker")
    if not 0 <= task_index < len(jobs.get(task_type, ())):
        raise UserError(f"{source}: task {task_type}:{task_index} is not in the cluster")
    for key, value in timeouts.items():
        if value is not None and not value > 0:
            raise UserError(f"{key.replace('_', '-')} must be positive, got {value}")
    return Cluster(jobs=jobs, task_type=task_type, task_index=task_index,
                   **{k: float(v) for k, v in timeouts.items() if v is not None})


def find_cluster(path=None, environ=None, **timeouts) -> Optional[Cluster]:
    """The cluster of ``--cluster FILE``, else of ``$TF_CONFIG``, else None."""
    if path is not None:
        try:
            text = pathlib.Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot read the cluster file {path} ({e.strerror})") from None
        return parse_cluster(text, source=str(path), **timeouts)
    text = (os.environ if environ is None else environ).get(TF_CONFIG, "").strip()
    if not text:
        return None
    return parse_cluster(text, **timeouts)


def _all_reduce(x, workers: int, instance_key: int, final_op: str, timeout: float):
    return tf.raw_ops.CollectiveReduceV2(
        input=x, group_size=workers, group_key=GROUP_KEY, instance_key=instance_key,
        ordering_token=[], merge_op="Add", final_op=final_op, communication_hint="auto",
        timeout_seconds=float(timeout))


def _flat(x, dtype):
    return tf.reshape(tf.cast(x, dtype), [-1])


def _split(packed, shapes):
    """Cut a flat vector into tensors of ``shapes``."""
    shapes = [tf.TensorShape(s) for s in shapes]
    sizes = [int(s.num_elements()) for s in shapes]
    pieces = tf.split(packed, sizes) if len(sizes) > 1 else [packed]
    return [tf.reshape(p, s) for p, s in zip(pieces, shapes)]


class StepReducer:
    """The ``reduce`` of :func:`replicate.build_replicated_graph` for ``workers`` processes.

    One all-reduce per step averages the gradients and the batch-norm statistics
    deltas (``values``: every process applies the averaged delta to the same
    moving statistics, so they stay equal everywhere and are the moving average
    of every process's tower-0 batch statistics), the metrics and the stop
    flags (any flag set gives a positive ``stop``).
    """

    def __init__(self, workers: int, timeout: float):
        self.workers = workers
        self.timeout = timeout
        self.stop_request = tf1.placeholder_with_default(0.0, [], name="stop_request")
        self.stop = None

    def __call__(self, values, metrics):
        names = sorted(metrics)
        values = [tf.convert_to_tensor(v) for v in values]
        tensors = values + [metrics[k] for k in names] + [self.stop_request]
        packed = tf.concat([_flat(v, tf.float32) for v in tensors], 0)
        mean = _all_reduce(packed, self.workers, STEP_KEY, "Div", self.timeout)
        parts = _split(mean, [v.shape for v in tensors])
        n = len(values)
        self.stop = parts[-1]
        return parts[:n], dict(zip(names, parts[n:n + len(names)]))


def config_fingerprint(cfg, precision: str, data_format: str) -> int:
    """A 31-bit checksum of everything that must agree between the tasks: the
    options, with the precision and layout each task resolved (``auto`` may pick
    fp16 on a task with a GPU and fp32 on one without)."""
    options = dict(cfg.to_dict(), precision=precision, data_format=data_format)
    return zlib.crc32(json.dumps(options, sort_keys=True).encode()) & 0x7FFFFFFF


class Watchdog:
    """Ends the process with one ``Error:`` line when a blocking call overruns."""

    def __init__(self):
        self._deadline = None
        self._message = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="watchdog")
        self._thread.start()

    def arm(self, seconds: float, message: str) -> None:
        with self._lock:
            self._deadline, self._message = time.monotonic() + seconds, message

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None

    def _watch(self):
        while True:
            time.sleep(0.5)
            with self._lock:
                expired = self._deadline is not None and time.monotonic() > self._deadline
                message = self._message
            if expired:
                sys.stderr.write(f"Error: {message}\n")
                sys.stderr.flush()
                os._exit(1)


class DistributedTrainer(Trainer):
    """A :class:`Trainer` that is one task of a synchronous data-parallel cluster.

    The chief does everything a single process does (config.json, history,
    checkpoints, validation and test); the other tasks only train and log
    their epochs on stderr.
    """

    def __init__(self, cfg, dataset, run_dir, history_path, *, cluster: Cluster, **kwargs):
        self.cluster = cluster
        self.workers = cluster.workers
        super().__init__(cfg, dataset, run_dir, history_path, **kwargs)
        if not cluster.is_chief:
            if self.progress_bar:
                self.log = lambda s: print(f"{s}", file=sys.stderr, flush=True)
            self.progress_bar = False
        self.stop_requested: Optional[int] = None
        self.server = None
        self.reducer = None
        self.watchdog = Watchdog()
        self.epoch = 0

    # -- graph and session ----------------------------------------------------------------
    def attach_train_graph(self):
        c, ds = self.cluster, self.dataset
        with tf.device(c.device_prefix + "/device:CPU:0"):
            self.reducer = StepReducer(c.workers, c.worker_timeout)
        t = build_replicated_graph(self.cfg, ds.mean, ds.std, len(ds.train),
                                   precision=self.precision, data_format=self.data_format,
                                   devices=self.devices, device_type=self.device_type,
                                   shard=(c.rank, c.workers), reduce=self.reducer,
                                   device_prefix=c.device_prefix)
        with tf.device(c.device_prefix + "/device:CPU:0"), tf1.name_scope("sync"):
            self.sync_op, self.fingerprints = self._broadcast_from_chief()
        with tf.device(c.device_prefix + "/device:CPU:0"), tf1.name_scope("barrier"):
            self.barrier = _all_reduce(tf.ones([1]), c.workers, BARRIER_KEY, "Id",
                                       c.worker_timeout)
        return t

    def _broadcast_from_chief(self):
        """Assign the chief's global variables to every task; also gather every task's
        configuration fingerprint (slot ``rank``)."""
        c = self.cluster
        variables = tf1.global_variables()
        own = []
        for v in variables:    # read where the variable lives (a GPU's, docs/architecture.md)
            with tf.device(v.device):
                own.append(v.read_value() if c.is_chief else tf.zeros(v.shape, v.dtype.base_dtype))
        own = [_flat(x, tf.float64) for x in own]
        slots = [0.0] * c.workers
        slots[c.rank] = float(config_fingerprint(self.cfg, self.precision, self.data_format))
        packed = tf.concat(own + [tf.constant(slots, tf.float64)], 0)
        total = _all_reduce(packed, c.workers, SYNC_KEY, "Id", c.startup_timeout)
        parts = _split(total, [v.shape for v in variables] + [[c.workers]])
        assigns = []
        for v, p in zip(variables, parts):
            with tf.device(v.device):
                assigns.append(v.assign(tf.cast(p, v.dtype.base_dtype)))
        return tf.group(*assigns), parts[-1]

    def make_summaries(self):
        """TensorBoard events: the chief's only (the others write nothing)."""
        return super().make_summaries() if self.cluster.is_chief else None

    def make_session(self, graph):
        c = self.cluster
        config = self.session_config()
        config.experimental.collective_group_leader = c.leader
        config.device_filters.append(c.device_prefix)
        address = c.jobs[c.task_type][c.task_index]
        try:
            self.server = tf1.train.Server(c.spec(), job_name=c.task_type,
                                           task_index=c.task_index, config=config, start=True)
        except (tf.errors.OpError, ValueError) as e:
            raise UserError(f"{c.name} cannot serve on {address} ({first_line(e)}); is the port "
                            "free and the address this machine's?") from None
        return tf1.Session(self.server.target, graph=graph, config=config)

    # -- lifecycle -------------------------------------------------------------------------
    def run(self):
        if self.cluster.is_chief:
            return super().run()
        with self._stop_on_signals():
            try:
                self.train_epochs()
            finally:
                self.watchdog.disarm()
                if self.sess is not None:
                    self.sess.close()
        return self.result

    def before_train(self):
        c = self.cluster
        if c.is_chief:
            super().before_train()
        else:
            init = self.build()
            self.sess.run(init)
            self.sess.run(self.t.load_data, {self.t.data_images: self.dataset.train.images,
                                             self.t.data_labels: self.dataset.train.labels})
        self.log(f"{c.name}: rank {c.rank} of {c.workers}, waiting for the other tasks")
        fingerprints = self._collective(
            lambda: self.sess.run([self.sync_op, self.fingerprints])[1], c.startup_timeout,
            f"could not synchronise with the other tasks (not all of them started within "
            f"{c.startup_timeout:.0f} s, or they were started with other options)")
        if len(set(float(f) for f in fingerprints)) != 1:
            raise UserError("the tasks were started with different training options, or resolved "
                            f"--precision/--data-format auto differently (this task: "
                            f"{self.precision} {self.data_format}); start every task with the "
                            "same options, on machines alike or with explicit --precision and "
                            "--data-format")
        if not c.is_chief:
            self.restore_position()   # the chief's, just broadcast
        self.log(f"{c.name}: in sync with {c.workers - 1} other task(s); starting at epoch "
                 f"{self.start_epoch} step {self.start_step}")

    def before_epoch(self, epoch: int):
        self.epoch = epoch
        super().before_epoch(epoch)

    def request_stop(self, signal_number: int = signal.SIGINT) -> None:
        """Ask every task to stop after the next step (the flag travels with it)."""
        self.stop_requested = signal_number

    def run_step(self, fetches, step: int):
        t, c = self.t, self.cluster
        feed = {t.batch_index: step, t.training: True,
                self.reducer.stop_request: 0.0 if self.stop_requested is None else 1.0}
        timeout = c.worker_timeout
        *out, stop = self._collective(
            lambda: self.sess.run(list(fetches) + [self.reducer.stop], feed), timeout,
            f"lost the other tasks at epoch {self.epoch}, step {step + 1} (a task died, stopped "
            f"or gave no gradients within {timeout:.0f} s); the chief's last checkpoint is "
            "kept: restart every task with --resume")
        if stop > 0 and self.stop_signal is None:
            self.stop_signal = self.stop_requested or signal.SIGTERM
        return out

    def _collective(self, run, timeout: float, message: str):
        """``run()`` a step that waits for the other tasks: a failure or overrun is one error."""
        self.watchdog.arm(timeout + WATCHDOG_MARGIN, f"{self.cluster.name}: {message}")
        try:
            return run()
        except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError,
                tf.errors.AbortedError, tf.errors.CancelledError, tf.errors.InternalError,
                tf.errors.UnknownError, tf.errors.FailedPreconditionError,
                tf.errors.InvalidArgumentError) as e:
            raise UserError(f"{self.cluster.name}: {message} [{type(e).__name__}]") from None
        finally:
            self.watchdog.disarm()

    def _stop(self, epoch: int, steps_done: int, progress=None) -> None:
        if self.cluster.is_chief:
            try:
                super()._stop(epoch, steps_done, progress)
            except TrainingInterrupted as e:
                raise TrainingInterrupted(f"{e} (on every task of the cluster)",
                                          e.signal_number) from None
        name = signal.Signals(self.stop_signal).name
        raise TrainingInterrupted(f"{self.cluster.name}: {name}: stopped with the other tasks "
                                  f"after step {steps_done} of epoch {epoch}; the chief wrote "
                                  "the checkpoint", self.stop_signal)

    def _fail(self, message: str) -> None:
        if self.cluster.is_chief:
            super()._fail(message)
        raise TrainingError(message)

    def after_epoch(self, epoch: int, row: dict):
        if self.cluster.is_chief:
            return super().after_epoch(epoch, row)
        row.pop("_start")
        self.sess.run(self.t.set_epochs_done, {self.t.epoch_placeholder: epoch})
        self.sess.run(self.t.set_epoch_progress, {self.t.progress_placeholder: [0.0, 0.0, 0.0]})
        self.log(f"{self.cluster.name}: epoch {epoch}/{self.cfg.epochs}  train loss "
                 f"{row['train_loss']:.4f} acc {row['train_acc']:.4f} (all workers)  "
                 f"{row['images_per_sec']:.0f} img/s (global batch)")

    def after_train(self):
        c = self.cluster
        try:
            self._collective(lambda: self.sess.run(self.barrier), c.worker_timeout,
                             f"the other tasks did not finish within {c.worker_timeout:.0f} s")
        except UserError as e:
            if not c.is_chief:
                raise
            self.log(f"warning: {e} (training is complete and saved)")
        if c.is_chief:
            super().after_train()
        else:
            time.sleep(LINGER_SECONDS)
