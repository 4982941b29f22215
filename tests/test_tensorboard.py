"""TensorBoard events: every run writes the documented tags into its folder."""

import glob

import numpy as np
import tensorflow as tf

from resnet_graph import data, history
from resnet_graph.config import TrainConfig
from resnet_graph.train import Trainer

tf1 = tf.compat.v1


def read_events(folder):
    files = glob.glob(str(folder / "events.out.tfevents.*"))
    assert len(files) == 1, files
    scalars, histograms, graph = {}, set(), False
    for event in tf1.train.summary_iterator(files[0]):
        graph = graph or bool(event.graph_def)
        for value in event.summary.value:
            if value.HasField("histo"):
                histograms.add(value.tag)
            else:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars, histograms, graph


class EveryFewSteps(Trainer):
    summary_steps = 3


def test_events_hold_epochs_steps_weights_and_gradients(tiny_data_dir, tmp_path):
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    cfg = TrainConfig(model="preact", depth=8, epochs=2, batch_size=50, valid_size=50, lr=0.01)
    EveryFewSteps(cfg, ds, tmp_path / "run", tmp_path / "h.h5", log=lambda s: None,
                  progress=False).run()
    scalars, histograms, graph = read_events(tmp_path / "run")
    assert graph
    run = history.read_run(tmp_path / "h.h5", "preact-8")
    steps = [5, 10]   # 250 training images / 50 per step
    for field in ("train_loss", "train_acc", "valid_loss", "valid_acc", "lr", "images_per_sec"):
        points = scalars[f"epoch/{field}"]
        assert [s for s, _ in points] == steps
        np.testing.assert_allclose([v for _, v in points], run.columns[field], rtol=1e-5)
    assert [s for s, _ in scalars["step/loss"]] == [3, 6, 9]
    assert "weights/stem/conv/kernel" in histograms
    assert "weights/dense/kernel" in histograms
    # The gradient norms are the history's grad_norm (the probe's), layer by layer.
    layers, norms = run.labels["grad_norm"], run.matrices["grad_norm"]
    assert len(layers) == 8 and layers[-1] == "dense"
    for i, layer in enumerate(layers):
        points = scalars[f"grad_norm/{layer}"]
        assert [s for s, _ in points] == steps
        np.testing.assert_allclose([v for _, v in points], norms[:, i], rtol=1e-6)
    assert [s for s, _ in scalars["grad_norm/global"]] == steps
    np.testing.assert_allclose([v for _, v in scalars["grad_norm/global"]],
                               np.sqrt((norms ** 2).sum(axis=1)), rtol=1e-5)
    assert (norms > 0).all()
    convs = [t for t in histograms if t.startswith("weights/") and t.endswith("/kernel")]
    assert len(convs) == 8   # 7 convolutions + the dense layer at depth 8
