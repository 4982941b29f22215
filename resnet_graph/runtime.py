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
from typing import Optional


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


@functools.lru_cache(maxsize=None)
def kernel_problem(data_format: str, precision: str, xla: bool = False) -> Optional[str]:
    """Why this machine's TensorFlow cannot train in ``data_format``/``precision``
    (with XLA if ``xla``), or None when it can.

    Runs one tiny training step of the ops the models use (a convolution, fused
    batch norm, their gradients) on the default device in a throwaway graph: a
    build decides its kernels (e.g. without oneDNN the CPU has no NCHW
    convolution), so asking it is the only reliable test. NHWC float32 without
    XLA always runs and is not probed.
    """
    if (data_format, precision, xla) == ("NHWC", "fp32", False):
        return None
    tf = load_tensorflow()
    tf1 = tf.compat.v1
    dtype = {"fp32": tf.float32, "fp16": tf.float16, "bf16": tf.bfloat16}[precision]
    shape = [2, 8, 8, 4] if data_format == "NHWC" else [2, 4, 8, 8]
    g = tf.Graph()
    with g.as_default():
        scope = tf.xla.experimental.jit_scope() if xla else contextlib.nullcontext()
        with scope:
            x = tf.cast(tf.random.stateless_normal(shape, seed=[0, 0]), dtype)
            kernel = tf1.get_variable("k", [3, 3, 4, 4], tf.float32)
            y = tf.nn.conv2d(x, tf.cast(kernel, dtype), strides=2, padding="SAME",
                             data_format=data_format)
            y = tf1.nn.fused_batch_norm(y, tf.ones([4]), tf.zeros([4]), data_format=data_format,
                                        is_training=True)[0]
            loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
            grads = tf.gradients(loss, [kernel, x])
        init = tf1.global_variables_initializer()
    try:
        with _stderr_silenced(), tf1.Session(graph=g) as sess:
            sess.run(init)
            sess.run(grads)
    except (tf.errors.OpError, ValueError, TypeError) as e:
        return error_reason(e)
    return None


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
    onednn = onednn_state()
    precision = resolve_precision("auto", gpus)
    facts = {
        "resnet_graph": _version(),
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
        "device": describe_device(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "cpu_bf16_units": cpu_has_bf16(),
        "cpu_features": sorted(cpu_flags() & INTERESTING_CPU_FLAGS),
        "onednn": onednn[0],
        "onednn_reason": onednn[1],
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
