"""Process-level TensorFlow set-up: a quiet import and the devices it sees.

TensorFlow's C++ runtime prints informational lines on stderr when it loads
(oneDNN notices, "could not find cuda drivers", absl preambles) that no
environment variable silences any more. :func:`load_tensorflow` sends file
descriptor 2 to /dev/null while it imports TensorFlow and asks for the GPU
list, then restores it; Python exceptions still propagate. Set
``RESNET_GRAPH_VERBOSE=1`` to see those lines.
"""

import contextlib
import functools
import os
import pathlib
import platform


@contextlib.contextmanager
def _stderr_silenced():
    if os.environ.get("RESNET_GRAPH_VERBOSE"):
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@functools.lru_cache(maxsize=None)
def load_tensorflow():
    """Import TensorFlow with its start-up chatter hidden; return the module."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _stderr_silenced():
        import tensorflow as tf
        tf.config.list_physical_devices("GPU")
    if not os.environ.get("RESNET_GRAPH_VERBOSE"):
        # Deprecation notes from tf.compat.v1 internals (e.g. the Saver's
        # "remove_checkpoint is deprecated") say nothing to a user.
        tf.get_logger().setLevel("ERROR")
    return tf


@functools.lru_cache(maxsize=None)
def gpu_count() -> int:
    tf = load_tensorflow()
    return len(tf.config.list_physical_devices("GPU"))


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16() -> bool:
    """True on CPUs with bfloat16 arithmetic units (AVX512_BF16 or AMX-BF16)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def describe_device() -> str:
    """A short name of the device that trains: the GPU's, else the CPU's."""
    tf = load_tensorflow()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"GPU: {details.get('device_name', gpus[0].name)} x{len(gpus)}"
    model = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    units = ", bf16 units" if cpu_has_bf16() else ""
    return f"CPU: {model} ({os.cpu_count()} cores{units})"


def environment_info(data_dir=None) -> dict:
    """What ``resnet-graph info`` reports: versions, devices, the ``auto`` choices, the data."""
    tf = load_tensorflow()
    from . import data
    from .errors import DataError
    from .graph import resolve_data_format, resolve_precision
    gpus = gpu_count() > 0
    precision = resolve_precision("auto", gpus)
    facts = {
        "resnet_graph": _version(),
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
        "device": describe_device(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "cpu_bf16_units": cpu_has_bf16(),
        "auto_precision": precision,
        "auto_data_format": resolve_data_format("auto", gpus, precision),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
    }
    try:
        folder = data.find_data_dir(data_dir, download=False, progress=False)
    except DataError as e:
        facts.update(data_dir=None, data_complete=False, data_problem=str(e))
        return facts
    problems = []
    if (folder / data.TEST_FILE).is_file():   # the binary layout: sizes are known
        for name in data.TRAIN_FILES + (data.TEST_FILE,):
            size = (folder / name).stat().st_size
            if size != 10000 * data.RECORD_BYTES:
                problems.append(f"{name} has {size} bytes, not {10000 * data.RECORD_BYTES}")
    facts.update(data_dir=str(folder), data_complete=not problems,
                 data_problem="; ".join(problems) or None)
    return facts


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("resnet-graph")
    except Exception:  # noqa: BLE001 - not installed (a source checkout)
        return "unknown"
