"""Shared fixtures: a tiny synthetic CIFAR-10 folder and quiet TensorFlow."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from synthetic import write_synthetic_cifar  # noqa: E402

from resnet_graph import fetch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A CIFAR-10 binary folder with 5 x 60 learnable training images and 100 test images."""
    folder = tmp_path_factory.mktemp("cifar")
    return write_synthetic_cifar(folder, n_train_per_batch=60, n_test=100, seed=0,
                                      learnable=True)


@pytest.fixture(autouse=True)
def _no_real_data_env(monkeypatch, request):
    """Unit tests never see the real data unless they ask for it (marker ``real_data``)."""
    if "real_data" not in request.keywords:
        monkeypatch.delenv(fetch.ENV_DATA_DIR, raising=False)
