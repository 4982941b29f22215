"""Small helpers shared by the reference benchmark scripts (run as `python bench/NAME.py`,
so this folder is on sys.path). They do not import resnet_graph on purpose: the references
must stand on their own."""

import pathlib
import platform


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check_training_args(parser, args):
    """Reject a depth that is not 6n+2 and non-positive step counts or batch sizes."""
    if args.depth < 8 or (args.depth - 2) % 6:
        parser.error(f"--depth {args.depth} is not 6n+2")
    if args.steps < 1 or args.warmup < 1 or args.batch_size < 1:
        parser.error("--steps, --warmup and --batch-size must be at least 1")
    return args
