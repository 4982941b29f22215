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
