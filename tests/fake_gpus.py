"""Make the package see GPUs that are not there, to build (never run) GPU graphs on a CPU."""

import tensorflow as tf

from resnet_graph import precision, replicate, runtime


def fake_gpus(monkeypatch, n: int) -> None:
    """TensorFlow's device list and the package's GPU count report ``n`` GPUs."""
    real = tf.config.list_physical_devices

    def listed(device_type=None):
        if device_type == "GPU":
            return [tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU")
                    for i in range(n)]
        return real(device_type)

    monkeypatch.setattr(tf.config, "list_physical_devices", listed)
    for module in (runtime, replicate, precision):
        monkeypatch.setattr(module, "gpu_count", lambda: n)
