"""The ``resnet-graph`` command line (contract: docs/cli.md).

Commands parse their options, build a config and call the library; they hold
no logic of their own. TensorFlow is imported inside the commands that need
it, so ``plot`` and ``--help`` start fast.

Errors: usage mistakes exit 2 (click's own); a :class:`UserError` prints one
line ``Error: ...`` and exits 1 (see :class:`Group`).
"""

import json
import os
import pathlib

import click

from .config import (
    DATA_FORMATS,
    INITS,
    LR_SCHEDULES,
    MODEL_ALIASES,
    OPTIMIZERS,
    PRECISIONS,
    RECIPES,
    STRIDE_PADDINGS,
    check_depth,
    make_config,
)
from .errors import TrainingInterrupted, UserError

DEFAULT_OUT = "checkpoints"


class TFCommand(click.Command):
    """A command that needs TensorFlow: it is imported (quietly, resnet_graph.runtime)
    once the options are parsed, so ``--help`` and usage errors answer without it."""

    def invoke(self, ctx):
        from .runtime import load_tensorflow
        load_tensorflow()
        return super().invoke(ctx)


def _depth(ctx, param, value):
    if value is None:
        return value
    try:
        return check_depth(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


MODEL = click.argument("model", type=click.Choice(sorted(MODEL_ALIASES), case_sensitive=False))
DEPTH = click.option("--depth", type=int, default=32, show_default=True, callback=_depth,
                     help="Total weighted layers, 6n+2.")
PRECISION = click.option("--precision", type=click.Choice(PRECISIONS),
                         default="auto", show_default=True,
                         help="Compute precision; weights stay float32. auto: fp16 on a GPU, "
                              "bf16 on a CPU with bf16 units, else fp32.")
EVAL_PRECISION = click.option(
    "--precision", type=click.Choice(PRECISIONS), default="auto",
    show_default=True, help="Compute precision; auto: the one the run trained in (fp32 for an "
    "fp16 run without a GPU). export always writes fp32.")
DATA_FORMAT = click.option("--data-format", type=click.Choice(DATA_FORMATS),
                           default="auto", show_default=True, help="Graph layout.")
XLA = click.option("--xla/--no-xla", default=False, show_default=True,
                   help="Compile the step with XLA.")
DATA_DIR = click.option("--data-dir", type=click.Path(file_okay=False, path_type=pathlib.Path),
                        help="Folder with the CIFAR-10 binary files "
                             "(else $RESNET_GRAPH_DATA_DIR, else the user cache).")


def _steps(value):
    if value is None:
        return None
    try:
        steps = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of steps") from None
    if any(b < 1 for b in steps) or list(steps) != sorted(set(steps)):
        raise click.BadParameter(f"{value!r}: steps must be positive and increasing")
    return steps


def _positive(ctx, param, value):
    if value is not None and value < 1:
        raise click.BadParameter(f"must be at least 1, got {value}")
    return value


class _ReaderGone(Exception):
    """The reader of stdout went away (``resnet-graph ... | head``)."""


class Group(click.Group):
    """Turns a :class:`UserError` into click's one-line ``Error: ...`` with exit code 1,
    and any other exception into the same unless ``RESNET_GRAPH_DEBUG`` is set."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except UserError as e:
            raise click.ClickException(str(e)) from None
        except TrainingInterrupted as e:
            click.echo(str(e), err=True)
            ctx.exit(128 + int(e.signal_number))
        except BrokenPipeError:
            # Past click's own handler of EPIPE (which exits 1): main() ends with 141.
            raise _ReaderGone() from None
        except Exception as e:  # noqa: BLE001 - the contract: one line, no traceback
            if os.environ.get("RESNET_GRAPH_DEBUG"):
                raise
            text = str(e).strip().splitlines()
            raise click.ClickException(
                f"{type(e).__name__}: {text[0] if text else ''} "
                "(set RESNET_GRAPH_DEBUG=1 for the traceback)") from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="resnet-graph")
@click.option("--verbose", is_flag=True,
              help="Show TensorFlow's own log lines (hidden by default); same as "
                   "RESNET_GRAPH_VERBOSE=1.")
def cli(verbose):
    """Train, evaluate and compare CIFAR-10 ResNets built as TensorFlow graphs.

    MODEL is original (post-activation ResNet), preact (pre-activation;
    alias proposed) or plain (no shortcuts; alias cnn).
    """
    if verbose:
        os.environ["RESNET_GRAPH_VERBOSE"] = "1"


RECIPE = click.option("--recipe", type=click.Choice(sorted(RECIPES)), default="seed",
                      show_default=True,
                      help="Named set of options: seed (the write-up), he2016 (the paper) or "
                           "fast (about an hour on a CPU with bf16 units).")
OUT = click.option("--out", type=click.Path(file_okay=False, path_type=pathlib.Path),
                   default=DEFAULT_OUT, show_default=True, help="Root folder for run folders.")
DEVICES = click.option("--devices", type=int, callback=_positive,
                       help="Towers in this process, one per GPU (else per logical CPU "
                            "device), splitting each --batch-size batch [1, or the resumed "
                            "run's].")
QUIET = click.option("--quiet", is_flag=True, help="No progress bar and no per-epoch lines.")
# Options that override the recipe: shared by train and experiment.
def _by_recipe(key: str, show=lambda v: v) -> str:
    """The help's default of a recipe option: ``[recipe; V]`` when every recipe has V,
    else what each recipe takes (``[recipe: seed 10000, he2016 5000, fast 5000]``)."""
    values = {name: make_config("original", name) for name in RECIPES}
    shown = {name: str(show(getattr(cfg, key))) for name, cfg in values.items()}
    if len(set(shown.values())) == 1:
        return f"[recipe; {next(iter(shown.values()))}]"
    return "[recipe: " + ", ".join(f"{name} {v}" for name, v in shown.items()) + "]"


RECIPE_OPTIONS = [
    click.option("--epochs", type=int, callback=_positive, help="Epochs [recipe]."),
    click.option("--batch-size", type=int, callback=_positive, help="Images per step [recipe]."),
    click.option("--lr", type=float, help="Base (peak) learning rate [recipe]."),
    click.option("--optimizer", type=click.Choice(OPTIMIZERS), help="[recipe]"),
    click.option("--nesterov/--no-nesterov", default=None, help="Nesterov momentum [recipe]."),
    click.option("--weight-decay", type=float, help="L2 coefficient on kernels [recipe]."),
    click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES),
                 help="constant; step (see --lr-boundaries); cosine (linear warm-up over "
                      "--warmup-epochs, then half cosine to 0) [recipe]."),
    click.option("--lr-boundaries", callback=lambda ctx, param, value: _steps(value),
                 help="Comma-separated optimizer steps at which the lr is divided by 10 "
                      "(a step schedule) [recipe]."),
    click.option("--warmup-epochs", type=click.FloatRange(min=0), help="[recipe]"),
    click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True),
                 help="[recipe]"),
    click.option("--augment/--no-augment", default=None,
                 help="4-pixel pad + random crop + horizontal flip [recipe]."),
    click.option("--valid-size", type=click.IntRange(min=0),
                 help="Training images held out for validation " + _by_recipe("valid_size") + "."),
    click.option("--train-examples", type=int, callback=_positive,
                 help="Use only the first N of the remaining training images."),
    click.option("--init", type=click.Choice(INITS),
                 help="Kernel initialisation of every convolution and the dense layer: he "
                      "(normal, variance 2/fan_in, He et al. 2015b) or glorot (uniform) "
                      + _by_recipe("init") + "."),
    click.option("--stride-padding", type=click.Choice(STRIDE_PADDINGS),
                 help="Padding of the stride-2 convolutions: symmetric (1 pixel on every "
                      "side, centred on the pixels the shortcut keeps; Caffe/Torch) or same "
                      "(TensorFlow's SAME: 0 on top/left, 1 at the bottom/right) "
                      + _by_recipe("stride_padding") + "."),
    click.option("--zero-init-residual/--no-zero-init-residual", default=None,
                 help="Start every residual branch at zero: gamma 0 in the branch's last "
                      "batch norm (original), the last convolution's kernel 0 (preact); "
                      "refused for plain " + _by_recipe("zero_init_residual", {True: "on", False: "off"}.get) + "."),
    click.option("--ema-decay", type=click.FloatRange(0, 1, max_open=True),
                 help="Exponential moving average of the weights (and batch-norm "
                      "statistics) with this decay, used for validation, test, eval, "
                      "predict and export; 0 = off " + _by_recipe("ema_decay", lambda v: f"{v:g}") + "."),
    PRECISION, DATA_FORMAT, XLA, DATA_DIR,
    click.option("--deterministic/--no-deterministic", default=None,
                 help="TensorFlow's op determinism: the same seed gives the same history on "
                      "the same machine (slower) [off]."),
    click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=pathlib.Path),
                 help="YAML or JSON file of options (a run's config.json works); flags given "
                      "on the command line win over it, and it wins over --recipe's values."),
]


def recipe_options(f):
    for option in reversed(RECIPE_OPTIONS):
        f = option(f)
    return f


def _config(model, recipe, **options):
    """A TrainConfig from a recipe, a --config file and the flags given.

    Precedence: flags typed on the command line, then the file, then the
    recipe (the file may name it), then TrainConfig's defaults.
    """
    from click.core import ParameterSource

    from .config import make_config, read_config_file
    options.pop("data_dir", None)
    config_file = options.pop("config_file", None)
    ctx = click.get_current_context()
    typed = {name for name in list(options) + ["recipe"]
             if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE,
                                                   ParameterSource.ENVIRONMENT)}
    if config_file is not None:
        try:
            from_file = read_config_file(config_file)
        except ValueError as e:
            raise UserError(str(e)) from None
        for key in ("model", "name", "seed"):   # the command (or the experiment) names these
            if key in from_file and (ctx.command.name == "experiment" or key != "seed"):
                from_file.pop(key)
        if "recipe" not in typed:
            recipe = from_file.pop("recipe", recipe)
        from_file.pop("recipe", None)
        for key, value in from_file.items():
            if key not in typed:
                options[key] = value
    if options.get("lr_boundaries") is not None and options.get("lr_schedule") is None:
        options["lr_schedule"] = "step"
    try:
        return make_config(model, recipe, **options)
    except (ValueError, TypeError) as e:
        raise click.UsageError(str(e)) from None


@cli.command(cls=TFCommand)
@MODEL
@DEPTH
@RECIPE
@recipe_options
@OUT
@click.option("--name", help="Run name [<model>-<depth>].")
@click.option("--history", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="HDF5 history file [<out>/histories.h5].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of data split and order, augmentation and initialisation.")
@click.option("--resume", is_flag=True, help="Continue run --name from its latest checkpoint.")
@DEVICES
@click.option("--cluster", "cluster_file", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="JSON file like $TF_CONFIG (cluster and task): train as one task of a "
                   "synchronous multi-process run; without it $TF_CONFIG is read "
                   "(docs/distributed.md).")
@click.option("--worker-timeout", type=click.FloatRange(min=0, min_open=True),
              help="Multi-process runs: seconds a step may wait for the other tasks before "
                   "the run stops with an error [120].")
@click.option("--startup-timeout", type=click.FloatRange(min=0, min_open=True),
              help="Multi-process runs: seconds to wait for every task to start [600].")
@QUIET
def train(model, recipe, out, history, resume, quiet, devices, cluster_file, worker_timeout,
          startup_timeout, **options):
    """Train MODEL on CIFAR-10 and record its history and checkpoints.

    With $TF_CONFIG or --cluster, this process is one task of a synchronous
    data-parallel run (see launch-local); only the chief writes files.
    """
    from .distributed import find_cluster
    from .runs import train_run
    data_dir = options["data_dir"]
    cfg = _config(model, recipe, **options)
    cluster = find_cluster(cluster_file, worker_timeout=worker_timeout,
                           startup_timeout=startup_timeout)
    # With --resume the run's own precision and layout hold, unless typed on purpose.
    from click.core import ParameterSource
    ctx = click.get_current_context()
    switch = {key: options[key] for key in ("precision", "data_format")
              if resume and ctx.get_parameter_source(key) == ParameterSource.COMMANDLINE}
    result = train_run(cfg, data_dir=data_dir, out=out, history_path=history, resume=resume,
                       epochs_override=options["epochs"], quiet=quiet, log=click.echo,
                       devices=devices, cluster=cluster, switch=switch)
    if not quiet and (cluster is None or cluster.is_chief):
        click.echo(f"run folder: {result['run_dir']}  history: {result['history']}")


def _models(ctx, param, value):
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n.lower() not in MODEL_ALIASES]
    if bad or not names:
        raise click.BadParameter(f"{value!r}: name models from {', '.join(sorted(MODEL_ALIASES))}")
    return names


def _depths(value):
    if value is None:
        return None
    try:
        depths = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of depths") from None
    if not depths or len(set(depths)) != len(depths):
        raise click.BadParameter(f"{value!r}: give one or more distinct depths")
    for d in depths:
        try:
            check_depth(d)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return depths


def _seeds(ctx, param, value):
    try:
        seeds = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise click.BadParameter(f"{value!r}: give one or more distinct seeds")
    return seeds


@cli.command(cls=TFCommand)
@RECIPE
@click.option("--models", default="original,preact,plain", show_default=True, callback=_models,
              help="Comma-separated models to train and compare.")
@DEPTH
@click.option("--depths", callback=lambda ctx, param, value: _depths(value),
              help="Comma-separated depths (6n+2) to sweep, e.g. 20,32,44,56: every model "
                   "once per depth and seed (instead of --depth).")
@click.option("--seeds", default="0", show_default=True, callback=_seeds,
              help="Comma-separated seeds; each model is trained once per seed.")
@click.option("--out", type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Folder for the runs, histories.h5, figures and report "
                   "[checkpoints/experiment-<recipe>-<depth>, or -<d1>-<d2>... with "
                   "--depths].")
@recipe_options
@DEVICES
@QUIET
@click.option("--json", "as_json", is_flag=True, help="Print report.json's object on stdout.")
def experiment(recipe, models, depth, depths, seeds, out, devices, quiet, as_json, **options):
    """Train several models (and seeds) in turn and compare them in one report.

    Writes <out>/histories.h5, loss.png, accuracy.png, report.md and
    report.json. Run the same command again after an interruption: finished
    runs are kept and the unfinished one continues from its checkpoint.
    """
    import sys

    from click.core import ParameterSource

    from .experiment import plan, run_experiment
    ctx = click.get_current_context()
    if depths is not None and ctx.get_parameter_source("depth") == ParameterSource.COMMANDLINE:
        raise click.UsageError("give either --depth or --depths, not both")
    base = _config(models[0], recipe, depth=depths[0] if depths else depth, **options)
    # The recipe and depth as resolved: a --config file may name them.
    tag = "-".join(map(str, depths)) if depths else str(base.depth)
    out = out or pathlib.Path(DEFAULT_OUT) / f"experiment-{base.recipe}-{tag}"
    try:
        configs = plan(base, models, seeds, depths)
    except UserError as e:   # e.g. an option one of the models refuses: as for the first
        raise click.UsageError(str(e)) from None
    log = (lambda s: None) if quiet or as_json else click.echo
    report = run_experiment(configs, out, data_dir=options["data_dir"], quiet=quiet or as_json,
                            log=log, command=" ".join(["resnet-graph"] + sys.argv[1:]),
                            devices=devices)
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(f"report: {report['report']}")


@cli.command("eval", cls=TFCommand)
@click.option("--ckpt", "run_dir", required=True,
              type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Run folder written by 'resnet-graph train'.")
@click.option("--split", type=click.Choice(["test", "valid"]), default="test", show_default=True)
@click.option("--batch-size", type=int, default=500, show_default=True, callback=_positive)
@click.option("--best", is_flag=True,
              help="Evaluate the checkpoint with the best validation accuracy, not the latest.")
@EVAL_PRECISION
@DATA_DIR
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Also write confusion.png and examples.png (predicted vs true) here.")
@click.option("--tta", type=click.Choice(["none", "flip"]), default="none", show_default=True,
              help="Test-time augmentation: flip averages the softmax of each image and its "
                   "left-right mirror (twice the evaluation work).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def eval_cmd(run_dir, split, batch_size, best, precision, data_dir, plot_dir, tta, as_json):
    """Evaluate the latest (or --best) checkpoint of a run on the test or validation split."""
    from .data import CLASS_NAMES
    from .evaluate import evaluate_run
    m = evaluate_run(run_dir, split=split, batch_size=batch_size, data_dir=data_dir, best=best,
                     plot_dir=plot_dir, precision=precision, flip=tta == "flip")
    if as_json:
        click.echo(json.dumps(m.to_json()))
        return
    extra = "  (flip-averaged)" if m.tta == "flip" else ""
    click.echo(f"{split}: {m.examples} images  loss {m.loss:.4f}  accuracy {m.accuracy:.4f}{extra}")
    for name, acc in zip(CLASS_NAMES, m.per_class_accuracy):
        click.echo(f"  {name:<12}{acc:.4f}")


@cli.command(cls=TFCommand, short_help="Std of every 3x3 layer's response (Fig. 7).")
@click.option("--ckpt", "run_dir", required=True,
              type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Run folder written by 'resnet-graph train' (or experiment).")
@click.option("--best", is_flag=True,
              help="Measure the best-validation checkpoint (writes responses-best.json).")
@click.option("--batch-size", type=int, default=500, show_default=True, callback=_positive)
@EVAL_PRECISION
@DATA_DIR
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def responses(run_dir, best, batch_size, precision, data_dir, as_json):
    """Layer responses (He et al. 2015, Fig. 7): the standard deviation of every 3x3
    convolution's response on the test set, written to RUN_DIR/responses.json.

    The response is the output of the batch norm that follows the convolution, before
    the addition and the ReLU; a preact block's second convolution has no batch norm
    before the addition, so there it is the convolution's own output, the residual
    function before the addition. 'resnet-graph plot' draws them.
    """
    from .analysis import layer_responses
    result = layer_responses(run_dir, best=best, data_dir=data_dir, batch_size=batch_size,
                             precision=precision)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{result['run']}: {len(result['layers'])} 3x3 convolutions, "
               f"{result['examples']} test images ({result['checkpoint']} checkpoint)")
    for layer in result["layers"]:
        click.echo(f"  {layer['index']:>3}  {layer['name']:<24} std {layer['std']:.4f}")


@cli.command(short_help="Draw loss, accuracy, error and layer figures.")
@click.argument("histories", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=pathlib.Path),
              default="figures", show_default=True, help="Folder for the PNG files.")
@click.option("--runs", "run_list", help="Comma-separated run names to draw (default: all).")
@click.option("--responses", "response_paths", multiple=True,
              type=click.Path(exists=True, path_type=pathlib.Path),
              help="responses.json files (or run folders holding one) to draw as "
                   "responses.png; repeatable. By default the responses.json of every drawn "
                   "run whose folder sits beside its history file.")
def plot(histories, out, run_list, response_paths):
    """Draw loss, accuracy, error (He et al. Fig. 6), gradient-norm and layer-response
    (Fig. 7) figures of the runs in HISTORY.h5 files."""
    from .plotting import label_responses, plot_runs, read_histories, read_responses
    selected = [r.strip() for r in run_list.split(",") if r.strip()] if run_list else None
    pairs = read_histories(histories, selected)
    runs = [run for _, run in pairs]
    found = [path.parent / run.name / "responses.json" for path, run in pairs]
    if selected is not None:
        missing = sorted(set(selected) - {r.name for r in runs})
        if missing:
            raise UserError(f"no run named {', '.join(missing)} in the given histories")
    files = [p / "responses.json" if p.is_dir() else p for p in response_paths] or \
        [p for p in found if p.is_file()]
    files = list({p.resolve(): p for p in files}.values())    # a file named twice: once
    responses = label_responses([read_responses(p) for p in files], files)
    for path in plot_runs(runs, out, responses, sources=[path for path, _ in pairs]):
        click.echo(str(path))


@cli.command(cls=TFCommand)
@MODEL
@DEPTH
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def summary(model, depth, as_json):
    """Print MODEL's layers and parameters per stage."""
    from .config import TrainConfig
    from .inspection import format_summary, model_summary
    s = model_summary(TrainConfig(model=model, depth=depth))
    click.echo(json.dumps(s) if as_json else format_summary(s))


@cli.command(cls=TFCommand)
@MODEL
@DEPTH
@click.option("--batch-size", type=int, default=100, show_default=True, callback=_positive)
@click.option("--steps", type=int, default=50, show_default=True, callback=_positive,
              help="Timed training steps (after --warmup steps).")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adam",
              show_default=True)
@click.option("--augment/--no-augment", default=False, show_default=True)
@click.option("--input", "input_mode", type=click.Choice(["graph", "feed"]), default="graph",
              show_default=True,
              help="graph: batches drawn inside the graph, as train does; feed: numpy feed_dict.")
@PRECISION
@DATA_FORMAT
@XLA
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def bench(model, depth, batch_size, steps, warmup, optimizer, augment, input_mode, precision,
          data_format, xla, as_json):
    """Time MODEL's training steps (forward, backward, update) in images/s."""
    from .config import TrainConfig
    from .inspection import benchmark
    if augment and input_mode == "feed":
        raise click.UsageError("--augment works on the in-graph input; --input feed feeds the "
                               "images as they are: drop one of them")
    cfg = TrainConfig(model=model, depth=depth, batch_size=batch_size, optimizer=optimizer,
                      augment=augment, precision=precision, data_format=data_format, xla=xla)
    r = benchmark(cfg, steps=steps, warmup=warmup, feed=input_mode == "feed")
    if as_json:
        click.echo(json.dumps(r))
    else:
        click.echo(f"{r['model']}-{r['depth']} batch {r['batch_size']} {r['precision']} "
                   f"{r['data_format']}{' xla' if r['xla'] else ''} {r['input']} input on "
                   f"{r['device']}: "
                   f"{r['images_per_sec']:.1f} images/s")


@cli.command("launch-local", context_settings={"ignore_unknown_options": True,
                                              "allow_interspersed_args": False})
@click.option("--workers", type=int, default=2, show_default=True, callback=_positive,
              help="Training processes; worker:0 is the chief.")
@click.option("--ps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Parameter servers: must be 0 (gradients are averaged by all-reduce).")
@click.option("--grace", type=click.FloatRange(min=0), default=15.0, show_default=True,
              help="Seconds a task gets to stop (after a failure or the chief's exit) "
                   "before it is killed.")
@click.option("--share-gpus", is_flag=True,
              help="When there are fewer GPUs than the tasks need (one per --devices each), "
                   "let every task use all of them instead of refusing.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def launch_local_cmd(workers, ps, grace, share_gpus, command):
    """Run `resnet-graph COMMAND...` as a cluster of processes on this machine.

    Example: resnet-graph launch-local --workers 2 -- train original --epochs 2

    Each task gets a TF_CONFIG with free loopback ports and its own GPU(s)
    (CUDA_VISIBLE_DEVICES) when there are enough; output lines are prefixed
    with the task name; when one task fails the others are stopped; the exit
    status is the chief's.
    """
    from .launch import launch_local
    if ps:
        raise click.UsageError("--ps: training averages gradients with collective all-reduce "
                               "and uses no parameter servers; drop --ps")
    ctx = click.get_current_context()
    ctx.exit(launch_local(list(command), workers, grace=grace, share_gpus=share_gpus))


@cli.command(cls=TFCommand)
@click.option("--ckpt", "run_dir", required=True,
              type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Run folder written by 'resnet-graph train'.")
@click.argument("images", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("--top", "top_k", type=click.IntRange(1, 10), default=3, show_default=True,
              help="Classes shown per image.")
@click.option("--best", is_flag=True, help="Use the best-validation checkpoint.")
@EVAL_PRECISION
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def predict(run_dir, images, top_k, best, precision, as_json):
    """Classify IMAGES (PNG/JPEG files of any size, or .npy batches of 32x32 RGB).

    Images are resized to 32x32 as a whole: box filter when shrinking, bicubic
    when enlarging (aspect ratio not kept).
    """
    from .serving import predict as run_predict
    results = run_predict(run_dir, images, best=best, precision=precision)
    if as_json:
        click.echo(json.dumps({"predictions": [r.to_json(top_k) for r in results]}))
        return
    for r in results:
        ranked = "  ".join(f"{name} {p:.3f}" for name, p in r.top(top_k))
        click.echo(f"{r.source}: {ranked}")


@cli.command(cls=TFCommand)
@click.option("--ckpt", "run_dir", required=True,
              type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Run folder written by 'resnet-graph train'.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="New folder for the SavedModel.")
@click.option("--best", is_flag=True, help="Export the best-validation checkpoint.")
def export(run_dir, out, best):
    """Write a run's model as a TensorFlow SavedModel (serving_default: uint8 images in;
    serving_float: float pixels 0..255 in; logits, probabilities and classes out)."""
    from .serving import export as run_export
    click.echo(str(run_export(run_dir, out, best=best)))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def recipes(as_json):
    """List the named recipes and their values."""
    from .config import RECIPES, SCHEDULE_STATE, make_config
    not_recipe = {"model", "name", "recipe", "depth", "seed", "precision", "data_format", "xla",
                  "train_examples"} | SCHEDULE_STATE
    table = {name: {k: v for k, v in make_config("original", name).to_dict().items()
                    if k not in not_recipe}
             for name in RECIPES}
    if as_json:
        click.echo(json.dumps(table))
        return
    from .config import RECIPE_NOTES
    keys = list(next(iter(table.values())))
    width = max(map(len, keys))
    click.echo(" " * width + "".join(f"  {name:<14}" for name in table))
    for key in keys:
        cells = "".join(f"  {_cell(table[name][key]):<14}" for name in table)
        click.echo(f"{key:<{width}}{cells}")
    click.echo("")
    for name in table:
        click.echo(f"{name}: {RECIPE_NOTES.get(name, '')}")


@cli.command(cls=TFCommand)
@DATA_DIR
@click.option("--check", is_flag=True,
              help="Also run a few training steps of a small ResNet in every precision, "
                   "layout and XLA setting and report for each whether it runs (else why "
                   "not), its images/s and its losses against fp32's: the first thing to "
                   "run on a new (GPU) machine.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def info(data_dir, check, as_json):
    """TensorFlow, devices, what --precision/--data-format auto pick, and the data folder."""
    from .inspection import environment_info, format_check, self_check
    facts = environment_info(data_dir)
    if check:
        facts["check"] = self_check()
    if as_json:
        click.echo(json.dumps(facts))
        return
    for key, value in facts.items():
        if key != "check":
            click.echo(f"{key + ':':<22}{_cell(value)}")
    if check:
        click.echo(format_check(facts["check"]))


def _cell(value) -> str:
    """A value for a plain-text table: strings as they are, None and [] as '-'."""
    if value is None or value == []:
        return "-"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return value if isinstance(value, str) else json.dumps(value)


def main(argv=None):
    """Console entry point."""
    try:
        cli.main(args=argv, prog_name="resnet-graph")
    except (_ReaderGone, BrokenPipeError):   # e.g. `resnet-graph eval ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)   # no second error at exit's flush
        raise SystemExit(141) from None


if __name__ == "__main__":
    main()
