"""Run folders: start a run or resume one, and pick the trainer that runs it.

:func:`train_run` is what ``resnet-graph train`` and ``experiment`` call: it
applies the resume rules (a new run refuses a name that has a folder or a
history group; a resumed one takes every option from its config.json, only
``--epochs`` may grow), checks what can be checked before anything is written,
loads the data, and hands the run to :class:`resnet_graph.train.Trainer` (one
process) or :class:`resnet_graph.distributed.DistributedTrainer` (a cluster).
"""

import pathlib
from typing import Callable, Optional

from . import checkpoint, data, fetch, history
from .config import TrainConfig, check_batch_split
from .distributed import DistributedTrainer
from .errors import UserError
from .precision import gpu_available, kernel_problem, resolve_data_format, resolve_precision
from .train import Trainer


def _holds_a_run(run_dir: pathlib.Path) -> bool:
    """Whether ``run_dir`` holds anything but what a start killed before config.json
    leaves behind (the lock file, a config.json temp file): such a folder can neither be
    resumed (no config) nor, if it counted as a run, be started again."""
    if not run_dir.is_dir():
        return run_dir.exists()
    return any(not checkpoint.is_leftover(p.name) for p in run_dir.iterdir())


def resumed_config(saved: dict, switch: Optional[dict] = None) -> TrainConfig:
    """The configuration a resumed run continues with: its config.json, with the
    precision and layout that ``auto`` resolved to when the run started
    (``resolved_precision``, ``resolved_data_format``), not what ``auto`` would pick
    on this machine: a run started on a GPU in fp16 stays fp16, a CPU run stays fp32.

    ``switch``: ``precision``/``data_format`` given with ``--resume`` on purpose, to
    go on in another precision or layout (``auto``: this machine's choice)."""
    cfg = TrainConfig.from_dict(saved)
    cfg = cfg.replace(precision=saved.get("resolved_precision", cfg.precision),
                      data_format=saved.get("resolved_data_format", cfg.data_format))
    switch = switch or {}
    if not switch:
        return cfg
    precision = resolve_precision(switch.get("precision", cfg.precision))
    # A new precision without --data-format: the run's own layout option, resolved anew.
    layout = switch.get("data_format", saved.get("data_format", "auto")
                        if "precision" in switch else cfg.data_format)
    return cfg.replace(precision=precision,
                       data_format=resolve_data_format(layout, precision=precision))


def check_resumable(name: str, cfg: TrainConfig) -> None:
    """One UserError line when this machine cannot run the precision and layout the
    run ``name`` was started with (see :func:`resumed_config`)."""
    problem = kernel_problem(cfg.data_format, cfg.precision, cfg.xla)
    if problem is None:
        return
    device = "GPU" if gpu_available() else "CPU (no GPU visible)"
    raise UserError(f"run {name!r} trains in {cfg.precision} {cfg.data_format}"
                    f"{' with XLA' if cfg.xla else ''} (resolved when it started, "
                    f"config.json), which this {device}'s TensorFlow cannot run ({problem}); "
                    "resume it on a machine that can, or go on here in this machine's "
                    "precision and layout with --resume --precision auto --data-format auto")


def train_run(cfg: TrainConfig, *, data_dir=None, out="checkpoints", history_path=None,
              resume: bool = False, epochs_override: Optional[int] = None,
              quiet: bool = False, log: Callable[[str], None] = print,
              devices: Optional[int] = None, cluster=None,
              switch: Optional[dict] = None) -> dict:
    """Start run ``cfg.name`` under ``out``, or continue it with ``resume``.

    A new run refuses a name that already has a run folder or a history group;
    a resumed run takes every option from its config.json (only ``--epochs``
    may change, to train longer). Returns the run folder, history file and
    test metrics.

    ``devices``: towers in this process (default 1, or the resumed run's).
    ``cluster``: a :class:`resnet_graph.distributed.Cluster` of several
    processes; only its chief touches ``out`` (docs/distributed.md).
    ``switch``: with ``resume``, ``precision``/``data_format`` to go on in instead of
    the run's own (see :func:`resumed_config`); ignored for a new run.
    """
    out = pathlib.Path(out)
    name = history.validate_run_name(cfg.name)
    run_dir = out / name
    history_path = pathlib.Path(history_path) if history_path else out / "histories.h5"
    chief = cluster is None or cluster.is_chief
    saved = {}
    if not chief:
        # Another machine has no run folder: a worker builds the model from its own
        # options (or this machine's config.json when resuming); the chief checks
        # at start that every task has the same configuration.
        if resume and (run_dir / "config.json").is_file():
            saved = checkpoint.read_config(run_dir)
            cfg = resumed_config(saved, switch)
    elif resume:
        if not (run_dir / "config.json").is_file():
            raise UserError(f"there is no run {name!r} in {out} to resume; drop --resume to start it")
        saved = checkpoint.read_config(run_dir)
        cfg = resumed_config(saved, switch)
        check_resumable(name, cfg)
    elif _holds_a_run(run_dir) or (
            history_path.exists() and history.has_run(history_path, name, guard=False)):
        raise UserError(f"run {name!r} already exists (in {run_dir} or {history_path}); "
                        "pass --resume to continue it or choose another --name")
    if chief:
        history.check_writable(history_path)
    if epochs_override:
        cfg = cfg.replace(epochs=epochs_override)
        done = checkpoint.epochs_done(run_dir) if resume and chief else None
        if done is not None and done > cfg.epochs:
            raise UserError(f"run {name!r} has done {done} epochs; --epochs {cfg.epochs} "
                            f"cannot shorten it: pass --epochs {done} or more")
    if devices is None:
        devices = int(saved.get("devices", 1)) if resume else 1
    # Before anything is written (the trainer checks it again for its own callers).
    check_batch_split(cfg.batch_size, devices, cluster.workers if cluster is not None else 1)
    # Data first: a data error must not leave an empty run folder behind.
    folder = fetch.find_data_dir(data_dir, saved_dir=saved.get("data_dir"), progress=not quiet)
    dataset = data.load_cifar10(folder, valid_size=cfg.valid_size,
                                train_examples=cfg.train_examples, seed=cfg.seed)
    options = dict(resume=resume, log=(lambda s: None) if quiet else log, progress=not quiet,
                   devices=devices)
    # The trainer refuses options this machine cannot run before anything is written.
    if cluster is not None and cluster.workers > 1:
        trainer = DistributedTrainer(cfg, dataset, run_dir, history_path, cluster=cluster,
                                     **options)
    else:
        trainer = Trainer(cfg, dataset, run_dir, history_path, **options)
    if chief:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            history_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {run_dir} ({e.strerror}); choose a writable --out") from None
    metrics = trainer.run()
    return {"run_dir": str(run_dir), "history": str(history_path), "test": metrics}
