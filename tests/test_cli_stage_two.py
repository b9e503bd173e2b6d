"""`decouple head`, `decouple info` and `decouple list` end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from click.testing import CliRunner

from cli.main import cli


def _run(args):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_head_json_is_designs_object_and_output_appends(tmp_path, gaussian_features):
    output = tmp_path / "results.jsonl"
    args = ["head", "--features", gaussian_features, "--loss", "balanced_softmax", "--epochs", "3",
            "--json", "--output", str(output)]
    printed = json.loads(_run(args))
    assert list(printed) == ["features", "head", "loss", "sampler", "seed", "params", "fit_seconds", "metrics",
                             "predictions"]
    assert (printed["head"], printed["loss"], printed["sampler"], printed["seed"]) == (
        "linear", "balanced_softmax", "instance", 0)
    assert printed["features"] == gaussian_features
    assert set(printed["metrics"]) == {"val", "test"}
    assert printed["params"]["train"]["epochs"] == 3
    # Every scored split's per-image predictions, from which its metrics follow.
    from decouple.predictions import SplitPredictions

    assert set(printed["predictions"]) == {"val", "test"}
    for split, data in printed["predictions"].items():
        predicted = SplitPredictions.from_json(data)
        assert predicted.top.shape == (printed["metrics"][split]["n"], 5)
        assert np.mean(predicted.predicted == predicted.labels) == printed["metrics"][split]["top1"]
        assert np.mean((predicted.top == predicted.labels[:, None]).any(axis=1)) == printed["metrics"][split]["top5"]
    _run(["head", "--features", gaussian_features, "--head", "ncm", "--output", str(output)])
    lines = output.read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0]) == printed
    second = json.loads(lines[1])
    assert second["head"] == "ncm" and second["loss"] is None and second["sampler"] is None


def test_head_precision_option_is_recorded_and_checked(gaussian_features):
    args = ["head", "--features", gaussian_features, "--epochs", "2", "--json"]
    from decouple.stage_two.config import TrainConfig

    default = json.loads(_run(args + ["--device", "cpu"]))["params"]["train"]["precision"]
    assert default == TrainConfig(device="cpu").validated().precision  # "auto", resolved
    assert json.loads(_run(args + ["--precision", "float32"]))["params"]["train"]["precision"] == "float32"
    printed = json.loads(_run(args + ["--precision", "bfloat16"]))
    assert printed["params"]["train"]["precision"] == "bfloat16"
    auto = json.loads(_run(args + ["--precision", "auto", "--device", "cpu"]))
    assert auto["params"]["train"]["precision"] in ("float32", "bfloat16")
    bad = CliRunner().invoke(cli, args + ["--precision", "fp16"])
    assert bad.exit_code == 2 and "fp16" in bad.output


def test_head_prints_a_table(gaussian_features):
    text = _run(["head", "--features", gaussian_features, "--head", "tau_norm", "--epochs", "3", "--seed", "2"])
    assert "tau_norm head, loss ce, sampler instance, seed 2" in text
    header = next(line for line in text.splitlines() if line.startswith("split"))
    assert header.split() == ["split", "n", "top1", "top5", "macro_f1", "many", "medium", "few"]
    assert any(line.startswith("test ") for line in text.splitlines())


def test_info_prints_splits_counts_and_groups(gaussian_features):
    text = _run(["info", gaussian_features])
    assert "classes: 20" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.split()[:1] in (["train"], ["val"], ["test"])}
    assert rows == {"train": ["2295", "32"], "val": ["1000", "32"], "test": ["2000", "32"]}
    assert "max 500, min 5, imbalance factor 100.0" in text
    assert "many 7 (> 100), medium 7 (20..100), few 6 (< 20)" in text
    summary = json.loads(_run(["info", gaussian_features, "--json"]))
    assert summary["splits"]["test"] == {"n": 2000, "dim": 32}


def test_list_prints_one_line_per_entry():
    lines = _run(["list", "heads"]).splitlines()
    assert [line.split()[0] for line in lines] == [
        "linear", "cosine", "tau_norm", "posthoc_la", "lws", "disalign", "ncm", "knn", "finetuned"]
    assert len(_run(["list", "losses"]).splitlines()) == 9
    assert [line.split()[0] for line in _run(["list", "samplers"]).splitlines()] == [
        "instance", "class_balanced", "square_root", "progressive", "calibrated_features"]
    everything = _run(["list"])
    assert "losses:" in everything and "samplers:" in everything and "heads:" in everything


def test_list_losses_names_ldams_scale_for_every_head_family():
    from decouple.stage_two.heads import HEADS, head_families

    trainable = {name: HEADS.get(name).logit_family for name in HEADS.names() if HEADS.get(name).trainable}
    assert trainable == {name: family for family, members in head_families().items() for name in members if name in HEADS.names()}
    assert head_families()["linear"][-1] == "stage one"
    ldam = next(line for line in _run(["list", "losses"]).splitlines() if line.startswith("ldam"))
    assert ldam.endswith("(s=1 on linear, tau_norm, posthoc_la, lws, disalign and stage one; s=30 on cosine)")


def test_help_imports_neither_torch_nor_faiss():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from cli.main import cli\n"
        "for command in ([], ['head'], ['info'], ['list']):\n"
        "    assert CliRunner().invoke(cli, command + ['--help']).exit_code == 0\n"
        "print(sorted(m for m in ('torch', 'faiss', 'h5py') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
