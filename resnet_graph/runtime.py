"""Process-level TensorFlow set-up: a quiet import, the devices and CPU features it
sees, the usable cores and the session's thread pools.

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
from typing import Optional


@contextlib.contextmanager
def stderr_silenced():
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
    with stderr_silenced():
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


def cpu_info(key: str) -> Optional[str]:
    """The value of the first ``key`` line of /proc/cpuinfo (None where there is none)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    return frozenset((cpu_info("flags") or "").split())


# The CPU features that decide kernels and precisions here.
INTERESTING_CPU_FLAGS = frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
                                   "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"})


def cpu_has_bf16() -> bool:
    """True on CPUs with bfloat16 arithmetic units (AVX512_BF16 or AMX-BF16)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def onednn_enabled() -> bool:
    """Whether this process's TensorFlow runs its CPU ops with oneDNN."""
    load_tensorflow()
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):   # a build without the probe
        return False


def onednn_state() -> tuple:
    """(enabled, why): whether oneDNN is on, and who decided (see the package docstring)."""
    import resnet_graph as pkg
    enabled = onednn_enabled()
    if pkg.TENSORFLOW_IMPORTED_FIRST:
        why = "TensorFlow was imported before resnet_graph, so its own default applies"
    elif pkg.ONEDNN_USER_VALUE is not None:
        why = f"{pkg.ONEDNN_ENV}={pkg.ONEDNN_USER_VALUE} was set in the environment"
    else:
        why = f"resnet-graph set {pkg.ONEDNN_ENV}=1 (it was unset)"
    return enabled, why


def error_reason(error) -> str:
    """The line of a TensorFlow error that says what went wrong: in a graph execution
    error, the line after the traceback of the failing node (``Node: '...'``)."""
    text = getattr(error, "message", None) or str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    nodes = [i for i, line in enumerate(lines) if line.startswith("Node:")]
    if nodes and nodes[-1] + 1 < len(lines):
        return lines[nodes[-1] + 1]
    plain = [line for line in lines if not line.startswith(("Graph execution error", "[["))]
    return (plain or lines or [type(error).__name__])[0]


def describe_device() -> str:
    """A short name of the device that trains: the GPU's, else the CPU's."""
    tf = load_tensorflow()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"GPU: {details.get('device_name', gpus[0].name)} x{len(gpus)}"
    model = cpu_info("model name") or platform.processor() or platform.machine()
    units = ", bf16 units" if cpu_has_bf16() else ""
    return f"CPU: {model} ({os.cpu_count()} cores{units})"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def session_config(cpu_devices: int = 1):
    """A ConfigProto: soft placement (uint8 data variables stay on the CPU where a
    GPU kernel is missing), GPU memory grown on demand, and thread pools sized
    explicitly to the usable cores: on the 2-core CPU of docs/performance.md
    that trained bf16 ResNet-32 1.2-1.5x faster than TensorFlow's defaults.

    Every session of the process is opened with it (the kernel probe, training,
    eval, predict, export, bench, ``info --check``; tests/test_session_config.py):
    on a GPU the first session creates the allocator from its options, so one
    session without them would map nearly all GPU memory and the others' growth
    setting would be ignored."""
    tf1 = load_tensorflow().compat.v1
    cores = usable_cores()
    config = tf1.ConfigProto(allow_soft_placement=True, intra_op_parallelism_threads=cores,
                             inter_op_parallelism_threads=cores)
    config.gpu_options.allow_growth = True
    if cpu_devices > 1:   # logical CPU devices for --devices N without GPUs
        config.device_count["CPU"] = cpu_devices
    return config
