"""predict, export (SavedModel), info and recipes through the CLI."""

import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image
from synthetic import write_synthetic_cifar

from resnet_graph import data
from resnet_graph.cli import cli
from resnet_graph.evaluate import open_run
from resnet_graph.serving import load_image

TINY = ["--depth", "8", "--epochs", "1", "--batch-size", "50", "--valid-size", "50"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, fragment):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], lines


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    folder = write_synthetic_cifar(root / "data", n_train_per_batch=60, n_test=100)
    result = invoke("train", "original", *TINY, "--data-dir", folder, "--out", root / "out",
                    "--quiet")
    assert result.exit_code == 0, result.output
    return root, root / "out" / "original-8", folder


def model_probabilities(run_dir, images, precision=None):
    with open_run(run_dir, precision=precision) as (sess, t, _):
        return sess.run([t.logits, t.probabilities], {t.images: images})


def test_predict_ranks_classes_like_the_model(run, tmp_path):
    _, run_dir, folder = run
    test = data.load_cifar10(folder, valid_size=50).test
    np.save(tmp_path / "batch.npy", test.images[:3])
    Image.fromarray(test.images[5]).save(tmp_path / "five.png")
    result = invoke("predict", "--ckpt", run_dir, tmp_path / "batch.npy", tmp_path / "five.png",
                    "--json", "--top", "10")
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.stdout)["predictions"]
    assert [p["source"] for p in predictions] == [
        f"{tmp_path / 'batch.npy'}[{i}]" for i in range(3)] + [str(tmp_path / "five.png")]
    _, probs = model_probabilities(run_dir, test.images[[0, 1, 2, 5]])
    for p, expected in zip(predictions, probs):
        got = {c["class"]: c["probability"] for c in p["top"]}
        assert [c["probability"] for c in p["top"]] == sorted(got.values(), reverse=True)
        np.testing.assert_allclose([got[name] for name in data.CLASS_NAMES], expected,
                                   rtol=1e-5, atol=1e-6)
    text = invoke("predict", "--ckpt", run_dir, tmp_path / "five.png")
    assert text.exit_code == 0 and text.output.count(":") == 1 and len(text.output.split()) == 7


def test_eval_and_predict_run_in_the_runs_precision_unless_told(run, tmp_path):
    _, run_dir, _ = run
    trained_in = json.loads((run_dir / "config.json").read_text())["resolved_precision"]

    def loss(*precision):
        result = invoke("eval", "--ckpt", run_dir, *precision, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["loss"]
    by_name = {p: loss("--precision", p) for p in ("fp32", "bf16")}
    assert loss() == by_name.get(trained_in, by_name["fp32"])
    assert by_name["bf16"] != by_name["fp32"]           # two graphs really ran
    assert by_name["bf16"] == pytest.approx(by_name["fp32"], rel=0.05)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "batch.npy", images)
    result = invoke("predict", "--ckpt", run_dir, tmp_path / "batch.npy", "--precision", "fp32",
                    "--json", "--top", "10")
    assert result.exit_code == 0, result.output
    _, probs = model_probabilities(run_dir, images, precision="fp32")
    got = [{c["class"]: c["probability"] for c in p["top"]}
           for p in json.loads(result.stdout)["predictions"]]
    np.testing.assert_allclose([[g[name] for name in data.CLASS_NAMES] for g in got], probs,
                               rtol=1e-5, atol=1e-6)


def test_eval_flip_averages_each_image_with_its_mirror(run):
    _, run_dir, folder = run
    test = data.load_cifar10(folder, valid_size=50).test
    plain, flipped = (json.loads(invoke("eval", "--ckpt", run_dir, "--batch-size", 33, "--json",
                                        *tta).stdout) for tta in ([], ["--tta", "flip"]))
    assert (plain["tta"], flipped["tta"]) == ("none", "flip")
    _, probs = model_probabilities(run_dir, test.images)
    _, mirrored = model_probabilities(run_dir, test.images[:, :, ::-1, :])
    assert not np.allclose(probs, mirrored)          # the mirror really is another input
    mean = (probs.astype(np.float64) + mirrored) / 2
    hits = np.argmax(mean, axis=1) == test.labels
    assert flipped["accuracy"] == pytest.approx(hits.mean())
    assert flipped["loss"] == pytest.approx(
        -np.log(mean[np.arange(len(test.labels)), test.labels]).mean(), rel=1e-5)
    assert plain["accuracy"] == pytest.approx((np.argmax(probs, 1) == test.labels).mean())
    assert sum(map(sum, flipped["confusion"])) == len(test.labels)
    text = invoke("eval", "--ckpt", run_dir, "--tta", "flip")
    assert text.exit_code == 0 and "flip-averaged" in text.output.splitlines()[0]


def test_images_of_any_size_become_32x32_rgb(tmp_path):
    big = np.zeros((64, 96, 3), np.uint8)
    big[:, :48] = 200            # left half bright: a box filter keeps exact halves
    Image.fromarray(big).save(tmp_path / "big.png")
    img = load_image(tmp_path / "big.png")
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert (img[:, :16] == 200).all() and (img[:, 16:] == 0).all()
    Image.fromarray(np.full((8, 8), 77, np.uint8), mode="L").save(tmp_path / "grey.jpg")
    small = load_image(tmp_path / "grey.jpg")
    assert small.shape == (32, 32, 3) and abs(int(small.mean()) - 77) <= 2


def test_16_bit_grey_transparency_and_exif_orientation(tmp_path):
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(tmp_path / "deep.png")
    assert (load_image(tmp_path / "deep.png") == 156).all()     # 40000 / 257, not clipped
    rgba = np.zeros((32, 32, 4), np.uint8)                       # left half: transparent black
    rgba[:, 16:] = (200, 0, 0, 255)                              # right half: opaque red
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "cut.png")
    img = load_image(tmp_path / "cut.png")
    assert (img[:, :16] == 255).all() and (img[:, 16:] == (200, 0, 0)).all()
    # Stored upside down with Orientation 3 (rotate 180): shown bright on the right.
    stored = np.zeros((32, 32, 3), np.uint8)
    stored[:, :16] = 200
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.fromarray(stored).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    img = load_image(tmp_path / "phone.jpg").astype(int)
    assert img[:, :14].mean() < 10 and img[:, 18:].mean() > 190


def test_an_export_is_nhwc_whatever_this_machine_would_pick(run, tmp_path, monkeypatch):
    from tensorflow.core.protobuf import saved_model_pb2

    from resnet_graph import evaluate
    _, run_dir, _ = run
    pick = evaluate.resolve_data_format
    # As on a GPU host, where `auto` picks NCHW for fp32.
    monkeypatch.setattr(evaluate, "resolve_data_format",
                        lambda fmt, precision: "NCHW" if fmt == "auto" else pick(fmt, precision))
    assert invoke("export", "--ckpt", run_dir, "--out", tmp_path / "saved").exit_code == 0
    model = saved_model_pb2.SavedModel()
    model.ParseFromString((tmp_path / "saved" / "saved_model.pb").read_bytes())
    layouts = [node.attr["data_format"].s for node in model.meta_graphs[0].graph_def.node
               if node.op in ("Conv2D", "FusedBatchNormV3", "MaxPool", "AvgPool")]
    # NHWC is the default, which strip_default_attrs leaves out (b"").
    assert layouts and set(layouts) <= {b"", b"NHWC"}, set(layouts)


def test_bench_refuses_augmentation_on_fed_images():
    result = CliRunner().invoke(cli, ["bench", "plain", "--input", "feed", "--augment"])
    assert result.exit_code == 2 and "--input feed" in result.output


@pytest.mark.parametrize("name, content, fragment", [
    ("notes.txt", b"hello", "give PNG or JPEG files"),
    ("empty.npy", "empty", "holds no images"),
    ("archive.npy", "npz", "is an .npz archive"),
    ("broken.png", b"\x89PNG not really", "not a readable PNG or JPEG"),
    ("wrong.npy", None, "expected [N, 32, 32, 3]"),
    ("hot.npy", "hot", "numbers in 0..255"),
])
def test_bad_prediction_inputs_are_one_line_errors(run, tmp_path, name, content, fragment):
    _, run_dir, _ = run
    path = tmp_path / name
    if content is None:
        np.save(path, np.zeros((2, 28, 28), np.uint8))
    elif content == "empty":
        np.save(path, np.zeros((0, 32, 32, 3), np.uint8))
    elif content == "npz":
        with open(path, "wb") as f:
            np.savez(f, images=np.zeros((1, 32, 32, 3), np.uint8))
    elif content == "hot":
        np.save(path, np.full((1, 32, 32, 3), 300.0))
    else:
        path.write_bytes(content)
    assert_one_line_error(invoke("predict", "--ckpt", run_dir, path), fragment)


def test_export_serves_the_same_logits_as_eval(run, tmp_path):
    _, run_dir, folder = run
    result = invoke("export", "--ckpt", run_dir, "--out", tmp_path / "saved")
    assert result.exit_code == 0, result.output
    test = data.load_cifar10(folder, valid_size=50).test
    # The SavedModel is float32 whatever the run trained in (bf16 where `auto`
    # picks it): it equals eval in fp32.
    logits, probs = model_probabilities(run_dir, test.images[:20], precision="fp32")
    loaded = tf.saved_model.load(str(tmp_path / "saved"))          # plain TF2, eager
    out = loaded.signatures["serving_default"](images=tf.constant(test.images[:20]))
    np.testing.assert_allclose(out["logits"].numpy(), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["probabilities"].numpy(), probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["classes"].numpy(), np.argmax(logits, 1))
    floats = loaded.signatures["serving_float"](images=tf.constant(test.images[:20], tf.float32))
    np.testing.assert_allclose(floats["logits"].numpy(), logits, rtol=1e-5, atol=1e-5)
    # eval's accuracy over the whole test split equals the SavedModel's.
    evaluated = json.loads(invoke("eval", "--ckpt", run_dir, "--precision", "fp32",
                                  "--json").stdout)
    served = loaded.signatures["serving_default"](images=tf.constant(test.images))
    accuracy = float(np.mean(served["classes"].numpy() == test.labels))
    assert accuracy == pytest.approx(evaluated["accuracy"])


def test_export_refuses_a_folder_with_files(run, tmp_path):
    _, run_dir, _ = run
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert_one_line_error(invoke("export", "--ckpt", run_dir, "--out", tmp_path / "taken"),
                          "not an empty folder")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_export_failures_leave_the_out_folder_as_it_was(run, tmp_path, monkeypatch):
    _, run_dir, _ = run
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(invoke("export", "--ckpt", tmp_path / "no-run", "--out", empty),
                          "no-run")
    assert empty.is_dir()          # the bad --ckpt is found before --out is touched

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device\nsecond line of detail")

    monkeypatch.setattr(tf.compat.v1.saved_model.Builder, "save", full_disk)
    assert_one_line_error(invoke("export", "--ckpt", run_dir, "--out", empty),
                          "No space left on device")
    assert empty.is_dir() and not any(empty.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]   # no temp folder left
    monkeypatch.undo()
    assert invoke("export", "--ckpt", run_dir, "--out", empty).exit_code == 0
    assert (empty / "saved_model.pb").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_info_reports_the_auto_choices_and_the_data(run, tmp_path):
    _, _, folder = run
    facts = json.loads(invoke("info", "--data-dir", folder, "--json").stdout)
    assert facts["tensorflow"] == tf.__version__
    assert facts["auto_precision"] in ("fp32", "fp16", "bf16")
    assert facts["auto_data_format"] in ("NHWC", "NCHW")
    # The synthetic files are complete but not CIFAR-sized: info says which.
    assert facts["data_dir"] == str(folder.resolve()) and facts["data_complete"] is False
    assert "data_batch_1.bin has" in facts["data_problem"]
    missing = json.loads(invoke("info", "--data-dir", tmp_path / "nothing", "--json").stdout)
    assert missing["data_complete"] is False and "does not exist" in missing["data_problem"]


def test_recipes_lists_every_recipe():
    table = json.loads(invoke("recipes", "--json").stdout)
    assert set(table) == {"seed", "he2016", "fast"}
    assert table["he2016"]["lr_boundaries"] == [32000, 48000]
    assert table["fast"]["label_smoothing"] == 0.1
    text = invoke("recipes").output
    assert "lr_schedule" in text and "cosine" in text
    # Issue 17: the blocks' options are recipe values too.
    assert {k: table["seed"][k] for k in ("init", "stride_padding", "zero_init_residual",
                                          "ema_decay")} == {
        "init": "glorot", "stride_padding": "same", "zero_init_residual": False, "ema_decay": 0.0}
    assert (table["he2016"]["init"], table["he2016"]["stride_padding"]) == ("he", "symmetric")
    assert (table["fast"]["init"], table["fast"]["stride_padding"]) == ("glorot", "same")
    he_line = [line for line in text.splitlines() if line.startswith("he2016:")][0]
    assert "He et al. 2015 Sec. 4.2" in he_line and "50,000" in he_line and "5,000" in he_line
    assert "--valid-size 0" in he_line


def test_predict_and_export_of_an_ema_run_use_the_averaged_weights(run, tmp_path):
    root, _, folder = run
    result = invoke("train", "original", *TINY, "--ema-decay", "0.9", "--optimizer", "momentum",
                    "--lr", "0.05", "--precision", "fp32", "--name", "ema", "--data-dir",
                    folder, "--out", root / "out", "--quiet")
    assert result.exit_code == 0, result.output
    run_dir = root / "out" / "ema"
    test = data.load_cifar10(folder, valid_size=50).test
    # The model with every variable replaced by its checkpointed shadow, by hand.
    reader = tf.train.load_checkpoint(str(tf.train.latest_checkpoint(str(run_dir))))
    from resnet_graph.config import TrainConfig
    from resnet_graph.graph import build_eval_graph
    saved = json.loads((run_dir / "config.json").read_text())
    g = tf.Graph()
    with g.as_default():
        t = build_eval_graph(TrainConfig.from_dict(saved), saved["normalization"]["mean"],
                             saved["normalization"]["std"])
        with tf.compat.v1.Session(graph=g) as sess:
            for v in tf.compat.v1.global_variables():
                v.load(reader.get_tensor(f"{v.op.name}/ExponentialMovingAverage"), sess)
            expected = sess.run(t.logits, {t.images: test.images[:20]})
            for v in tf.compat.v1.global_variables():
                v.load(reader.get_tensor(v.op.name), sess)
            raw = sess.run(t.logits, {t.images: test.images[:20]})
    assert not np.allclose(raw, expected, atol=1e-3)   # the averages are not the raw weights
    np.save(tmp_path / "batch.npy", test.images[:20])
    predicted = json.loads(invoke("predict", "--ckpt", run_dir, tmp_path / "batch.npy", "--top",
                                  "10", "--json").stdout)["predictions"]
    probs = np.exp(expected) / np.exp(expected).sum(1, keepdims=True)
    for p, row in zip(predicted, probs):
        got = {c["class"]: c["probability"] for c in p["top"]}
        np.testing.assert_allclose([got[n] for n in data.CLASS_NAMES], row, rtol=1e-4, atol=1e-6)
    assert invoke("export", "--ckpt", run_dir, "--out", tmp_path / "saved").exit_code == 0
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    out = loaded.signatures["serving_default"](images=tf.constant(test.images[:20]))
    np.testing.assert_allclose(out["logits"].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_eval_plot_draws_the_confusion_matrix_and_examples(run, tmp_path):
    _, run_dir, folder = run
    result = invoke("eval", "--ckpt", run_dir, "--plot", tmp_path / "figs", "--json")
    assert result.exit_code == 0, result.output
    confusion = np.array(json.loads(result.stdout)["confusion"])
    for name in ("confusion.png", "examples.png"):
        with Image.open(tmp_path / "figs" / name) as img:
            assert img.format == "PNG" and img.width > 500 and img.height > 300
    # The kept predictions agree with the confusion matrix they were counted into.
    from resnet_graph.evaluate import evaluate
    test = data.load_cifar10(folder, valid_size=50).test
    with open_run(run_dir) as (sess, t, _):
        m = evaluate(sess, t, test, keep_predictions=True)
    assert m.predictions.shape == (len(test),)
    counted = np.zeros((10, 10), int)
    np.add.at(counted, (test.labels, m.predictions), 1)
    np.testing.assert_array_equal(counted, confusion)
