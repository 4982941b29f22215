"""Every Session the package opens gets the process's one session configuration
(runtime.session_config): the kernel probe, training, evaluation, predict, export,
bench and info --check alike. On a GPU the first session creates the allocator, so a single
session without these options (e.g. the probe) would map all the GPU's memory."""

import numpy as np
import pytest
import tensorflow as tf

from resnet_graph import precision
from resnet_graph.config import TrainConfig
from resnet_graph.evaluate import evaluate_run
from resnet_graph.inspection import benchmark, self_check
from resnet_graph.runs import train_run
from resnet_graph.runtime import session_config, usable_cores
from resnet_graph.serving import export, predict

tf1 = tf.compat.v1


@pytest.fixture
def sessions(monkeypatch):
    """Record (caller's file, config) of every tf.compat.v1.Session created."""
    opened = []
    real = tf1.Session

    class Recording(real):
        def __init__(self, *args, **kwargs):
            import inspect
            caller = inspect.stack()[1].filename
            opened.append((caller, kwargs.get("config")))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tf1, "Session", Recording)
    return opened


def _same_options(config) -> bool:
    expected = session_config()
    return (config is not None
            and config.gpu_options == expected.gpu_options
            and config.gpu_options.allow_growth
            and config.allow_soft_placement
            and config.intra_op_parallelism_threads == usable_cores()
            and config.inter_op_parallelism_threads == usable_cores())


def test_every_session_of_train_eval_predict_export_bench_and_the_probe_gets_the_config(
        sessions, tiny_data_dir, tmp_path):
    precision.kernel_problem.cache_clear()   # so that this process probes again
    cfg = TrainConfig(model="original", depth=8, epochs=1, batch_size=50, valid_size=50,
                      train_examples=100, lr=0.01, data_format="NCHW", name="s")
    train_run(cfg, data_dir=tiny_data_dir, out=tmp_path, quiet=True)
    run_dir = tmp_path / "s"
    evaluate_run(run_dir, data_dir=tiny_data_dir)
    pixels = tmp_path / "x.npy"
    np.save(pixels, np.zeros((2, 32, 32, 3), np.uint8))
    predict(run_dir, [pixels])
    export(run_dir, tmp_path / "exported")
    benchmark(TrainConfig(model="original", depth=8, batch_size=10), steps=1, warmup=0,
              num_images=20)
    self_check([("fp32", "NHWC", False)])     # info --check
    callers = [f.rsplit("/", 1)[-1] for f, _ in sessions]
    # the probe (NCHW is probed), the trainer, eval/predict/export (open_run), bench, check
    assert {"precision.py", "train.py", "evaluate.py", "inspection.py"} <= set(callers), callers
    assert callers.count("evaluate.py") == 3 and callers.count("inspection.py") == 2, callers
    bad = [(f, c) for f, c in sessions if not _same_options(c)]
    assert not bad, bad
