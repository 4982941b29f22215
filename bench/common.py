"""Small helpers shared by the reference benchmark scripts (run as `python bench/NAME.py`,
so this folder is on sys.path). They do not import resnet_graph on purpose: the references
must stand on their own."""

import argparse
import pathlib
import platform

EXPECTED_PARAMS = 464_154          # trainable parameters of ResNet-32, option A
STAGE_FILTERS = (16, 32, 64)
NUM_CLASSES = 10


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


def training_parser(description: str) -> argparse.ArgumentParser:
    """The options every reference trainer takes (depth, batch, steps, precision, ...)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--depth", type=int, default=32, help="6n+2; the check of the parameter "
                   "count applies to 32 only")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--steps", type=int, default=50, help="timed training steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (at least 1)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    return p
