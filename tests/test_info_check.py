"""``resnet-graph info --check``: a few training steps in every precision, layout and XLA
setting, each reported as running (with img/s and its losses against fp32's) or not (why)."""

import json
import math

import pytest
from click.testing import CliRunner

from resnet_graph import inspection
from resnet_graph.cli import cli
from resnet_graph.precision import kernel_problem

# A subset keeps the test short (the full check, XLA included, is measured in
# docs/performance.md): one setting this CPU has no kernel for (fp16 NCHW here), and
# fp16, whose graph (loss scaling first) would draw other initial weights from the seed.
SETTINGS = (("fp32", "NHWC", False), ("fp32", "NCHW", False), ("fp16", "NCHW", False),
            ("fp16", "NHWC", False), ("bf16", "NHWC", False))


@pytest.fixture
def subset(monkeypatch):
    monkeypatch.setattr(inspection, "CHECK_SETTINGS", SETTINGS)


def test_info_check_reports_every_setting_with_its_speed_and_its_losses(subset):
    result = CliRunner().invoke(cli, ["info", "--check", "--json"])
    assert result.exit_code == 0, result.output
    check = json.loads(result.output)["check"]
    assert (check["depth"], check["batch_size"], check["steps"]) == (8, 32, 4)
    entries = check["settings"]
    assert [(e["precision"], e["data_format"], e["xla"]) for e in entries] == list(SETTINGS)
    reference = entries[0]
    assert reference["runs"] and reference["loss_difference"] == 0.0
    assert check["reference_losses"] == reference["losses"]
    for e in entries:
        problem = kernel_problem(e["data_format"], e["precision"], e["xla"])
        assert e["runs"] == (problem is None), e
        if not e["runs"]:
            assert e["reason"] == problem and e["images_per_sec"] is None
            continue
        assert e["reason"] is None and e["images_per_sec"] > 0
        assert len(e["losses"]) == 4 and all(math.isfinite(x) for x in e["losses"])
        assert e["loss_agrees"], e
    # The same float32 step in another layout: the same losses from the same weights.
    nchw = entries[1]
    if nchw["runs"]:
        assert nchw["loss_difference"] < 1e-4
        assert abs(nchw["losses"][0] - reference["losses"][0]) < 1e-4


def test_a_loss_that_disagrees_with_fp32_is_reported(subset, monkeypatch):
    monkeypatch.setitem(inspection.LOSS_TOLERANCE, "bf16", 1e-9)   # bf16 rounds more
    result = CliRunner().invoke(cli, ["info", "--check"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("check: "))):]
    assert table[1].split() == ["precision", "layout", "xla", "runs", "img/s", "max", "loss",
                                "diff", "agrees"]
    rows = {tuple(x.split()[:3]): x for x in table[2:-1]}
    assert len(rows) == len(SETTINGS)
    assert rows[("bf16", "NHWC", "no")].split()[6] == "NO"
    assert rows[("fp32", "NCHW", "no")].split()[6] == "yes"
