"""resnet-graph: train, evaluate and compare CIFAR-10 ResNets in TensorFlow's graph style."""

from setuptools import find_packages, setup

setup(
    name="resnet-graph",
    version="0.1.0",
    description="Original, pre-activation and plain ResNets on CIFAR-10 with tf.compat.v1 graphs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["resnet_graph", "resnet_graph.*"]),
    install_requires=[
        # The newest minor release the test suite has passed on is the upper bound;
        # constraints.txt pins the versions `make test` ran with.
        "tensorflow>=2.16,<2.22",
        "numpy",
        "click>=8",
        "h5py",
        "filelock>=4.3",
        "matplotlib",
        "tqdm",
        "Pillow",
        "PyYAML",
        # `tensorboard --logdir checkpoints` (README): TensorFlow no longer installs it.
        # Bounded like TensorFlow, whose release it follows.
        "tensorboard>=2.16,<2.22",
    ],
    # `make test` also runs the linters (ruff.toml, .importlinter).
    extras_require={"test": ["pytest", "pytest-xdist", "hypothesis", "ruff", "import-linter"]},
    entry_points={"console_scripts": ["resnet-graph=resnet_graph.cli:main"]},
)
