"""resnet-graph: residual networks on CIFAR-10 in TensorFlow's graph style."""

__version__ = "0.1.0"
