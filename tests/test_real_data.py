"""One short run on the real CIFAR-10, when $RESNET_GRAPH_DATA_DIR points at it (CI sets it)."""

import os

import pytest

from resnet_graph import data, fetch, history
from resnet_graph.config import make_config
from resnet_graph.runs import train_run

pytestmark = pytest.mark.real_data


@pytest.fixture
def real_data_dir():
    folder = os.environ.get(fetch.ENV_DATA_DIR)
    if not folder:
        pytest.skip(f"${fetch.ENV_DATA_DIR} is not set")
    return fetch.find_data_dir(folder, download=False, progress=False)


def test_real_data_loads_with_the_documented_statistics(real_data_dir):
    ds = data.load_cifar10(real_data_dir, valid_size=0)
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (50000, 0, 10000)
    # ../shared/data/README.md: train mean (0.4913, 0.4821, 0.4465) on a 0-1 scale.
    assert [round(m / 255, 3) for m in ds.mean] == pytest.approx([0.491, 0.482, 0.447], abs=1e-3)


def test_one_epoch_of_resnet32_on_2000_real_images_beats_chance(real_data_dir, tmp_path):
    # Adam at the seed recipe's lr 0.005 is erratic over only 20 steps (the moving
    # averages of batch norm lag far behind); 40 steps at lr 0.001 learn steadily.
    cfg = make_config("original", "seed", epochs=1, train_examples=2000, valid_size=2000,
                      batch_size=50, lr=0.001)
    result = train_run(cfg, data_dir=real_data_dir, out=tmp_path, quiet=True)
    run = history.read_run(result["history"], cfg.name)
    assert run.epochs == 1
    # 10,000 test images: chance is 10% with a standard error of 0.3%, so 15% is
    # more than 15 standard errors above it.
    assert result["test"].examples == 10000
    assert result["test"].accuracy > 0.15, result["test"].accuracy
    assert run.attrs["test_acc"] == result["test"].accuracy
