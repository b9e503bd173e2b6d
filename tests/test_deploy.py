"""The way out: model files (`decouple save-model`, `head --save-model`),
`decouple predict`, `decouple.load_model` and the TorchScript export, end
to end on real CIFAR-10 JPEGs (stage one, a sweep, the val-best model, then
the test images classified again from their files)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

import decouple
import decouple.errors
from cli.main import cli
from decouple.deploy.model_file import FORMAT, read_model_file
from decouple.features import read_features
from decouple.stage_one.manifest import read_manifest
from decouple.stage_two.heads import create_head
from decouple.study.export import labelled_methods
from decouple.study.store import load_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GRID = {"head": ["linear", "tau_norm", "cosine", "ncm"], "loss": ["ce", "balanced_softmax"],
        "sampler": ["instance"], "seed": [0]}


def invoke(args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def run(cifar_subset, tmp_path_factory):
    """A fine-tuned test_resnet's float16 feature file (+ checkpoint and
    manifest), a sweep over it and the val-best model saved from it."""
    root = tmp_path_factory.mktemp("deploy")
    extract = invoke([
        "extract", "--data", cifar_subset, "--backbone", "test_resnet", "--imbalance", "10",
        "--val-per-class", "4", "--epochs", "2", "--batch-size", "32", "--features-dir", root / "features",
        "--name", "cifar", "--no-progress",
    ])
    assert extract.exit_code == 0, extract.output
    features = root / "features" / "cifar.h5"
    config = root / "sweep.yaml"
    config.write_text(yaml.safe_dump({"features": [str(features)], "grid": GRID, "db": str(root / "results.db")}))
    sweep = invoke(["sweep", config])
    assert sweep.exit_code == 0, sweep.output
    saved = invoke(["save-model", "--db", root / "results.db", "-o", root / "best.pt"])
    assert saved.exit_code == 0, saved.output
    return {"root": root, "features": features, "db": root / "results.db", "best": root / "best.pt",
            "manifest": root / "features" / "cifar.manifest.csv"}


# --------------------------------------------------------------------------- heads as torch modules


@pytest.mark.parametrize("name, params", [
    ("linear", {}), ("cosine", {}), ("tau_norm", {}), ("lws", {}), ("disalign", {}), ("ncm", {}),
    ("ncm", {"metric": "l2"}), ("knn", {}), ("knn", {"metric": "l2", "k": 3}),
])
def test_every_head_scorer_gives_its_decision_function(name, params):
    rng = np.random.default_rng(0)
    means = rng.normal(size=(6, 12)) * 2
    y = np.repeat(np.arange(6), [60, 30, 15, 8, 5, 3])
    X = (means[y] + rng.normal(size=(len(y), 12))).astype(np.float32)
    y_val = np.repeat(np.arange(6), 8)
    X_val = (means[y_val] + rng.normal(size=(len(y_val), 12))).astype(np.float32)
    head = create_head(name, **params)
    head.fit(X, y, X_val=X_val, y_val=y_val, train=None) if head.trainable else head.fit(X, y)
    expected = head.decision_function(X_val)
    got = head.scorer()(torch.from_numpy(X_val)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


def test_the_disalign_scorer_survives_the_model_file_and_the_portable_formats(tmp_path):
    """Its sigmoid confidence is not linear, so it has a scorer of its own:
    rebuilt from its tensors, traced and exported to ONNX, it still gives
    the head's scores."""
    from decouple.stage_two.scorers import rebuild_scorer

    rng = np.random.default_rng(1)
    means = rng.normal(size=(5, 8)) * 2
    y = np.repeat(np.arange(5), [50, 25, 12, 6, 3])
    X = (means[y] + rng.normal(size=(len(y), 8))).astype(np.float32)
    head = create_head("disalign").fit(X, y, X_val=X[::3], y_val=y[::3])
    queries = (means[np.arange(7) % 5] + rng.normal(size=(7, 8))).astype(np.float32)
    expected = head.decision_function(queries)
    scorer = head.scorer()
    rebuilt = rebuild_scorer(type(scorer).registered_name(), scorer.state_dict(), scorer.settings()).eval()
    inputs = torch.from_numpy(queries)
    with torch.no_grad():
        np.testing.assert_allclose(rebuilt(inputs).numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.*deprecated")
            traced = torch.jit.trace(rebuilt, inputs[:2])
        np.testing.assert_allclose(traced(inputs).numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    path = tmp_path / "disalign.onnx"
    torch.onnx.export(rebuilt, (inputs[:2],), str(path), input_names=["x"], output_names=["scores"], dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": queries})[0], expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())


# --------------------------------------------------------------------------- the model file


def test_model_file_is_plain_tensors_and_records_how_it_was_chosen(run):
    archive = torch.load(run["best"], map_location="cpu", weights_only=True)
    assert archive["format"] == FORMAT and archive["version"] == 1
    meta = json.loads(archive["meta"])
    features = read_features(run["features"])
    assert meta["class_names"] == features.class_names
    assert meta["preprocess"]["input_size"] == [3, 32, 32] and len(meta["preprocess"]["mean"]) == 3
    assert meta["backbone"]["weights_sha256"] == features.attrs["model_sha256"]
    assert meta["backbone"]["weights_source"].startswith("checkpoint")
    assert meta["temperature"]["selected_on"] == "val" and meta["temperature"]["value"] > 0
    assert meta["provenance"]["features_sha256"] and meta["provenance"]["versions"]["torch"]
    assert {"val", "test", "test_lt"} <= set(meta["metrics"])
    # Chosen on val, as the method with the best mean val score (test never looked at).
    selection = meta["selection"]
    assert selection["split"] == "val" and selection["metric"] == "mean_class_acc"
    assert selection["refit_matches"] is True
    records = load_records(run["db"])
    means = {}
    for record, label in zip(records, labelled_methods(records)):
        means.setdefault(json.dumps(label, sort_keys=True), []).append(record.metrics["val"]["mean_class_acc"])
    assert selection["method_mean"] == max(np.mean(values) for values in means.values())
    chosen = next(record for record in records if record.cell_key == selection["cell_key"])
    assert (meta["method"]["head"], meta["method"]["loss"]) == (chosen.head, chosen.loss)
    assert meta["metrics"]["test"]["top1"] == chosen.metrics["test"]["top1"]  # the refit is the same head


def test_save_model_never_selects_on_test(run, tmp_path):
    result = invoke(["save-model", "--db", run["db"], "--select", "test", "-o", tmp_path / "m.pt"])
    assert result.exit_code == 2 and "'test' is not" in result.output
    assert not (tmp_path / "m.pt").exists()


# --------------------------------------------------------------------------- the round trip


def _top1_of_rows(text: str) -> tuple:
    rows = [json.loads(line) for line in text.splitlines()]
    assert all(row["error"] is None for row in rows)
    return np.mean([row["labels"][0] == row["label"] for row in rows]), len(rows)


@pytest.mark.parametrize("head", ["best", "linear", "tau_norm", "ncm"])
def test_predict_on_the_test_images_scores_what_the_sweep_recorded(run, head, tmp_path):
    """The images go through the saved backbone again (float32) where the
    sweep scored the float16 cache: top-1 agrees to 0.3 points or 2 images."""
    model = run["best"]
    if head != "best":
        model = tmp_path / f"{head}.pt"
        saved = invoke(["head", "--features", run["features"], "--head", head, "--save-model", model, "--json"])
        assert saved.exit_code == 0, saved.output
    meta = read_model_file(model).meta
    result = invoke(["predict", model, run["manifest"], "--split", "test", "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    top1, n = _top1_of_rows(result.stdout)
    assert n == meta["metrics"]["test"]["n"]
    assert abs(top1 - meta["metrics"]["test"]["top1"]) <= max(0.003, 2 / n) + 1e-9


def test_predict_under_the_train_prior_scores_what_the_view_recorded(run, tmp_path):
    """``predict --target-prior train`` on the long-tailed test images gives
    the top-1 that ``head --view test_lt@train`` recorded on the cache; a
    bad prior file is one clear error."""
    model = tmp_path / "balanced.pt"
    saved = invoke(["head", "--features", run["features"], "--loss", "balanced_softmax", "--view", "test_lt@train",
                    "--save-model", model, "--json"])
    assert saved.exit_code == 0, saved.output
    meta = read_model_file(model).meta
    assert meta["prior"]["assumed"] == "uniform"
    result = invoke(["predict", model, run["manifest"], "--split", "test_lt", "--format", "jsonl",
                     "--target-prior", "train"])
    assert result.exit_code == 0, result.output
    top1, n = _top1_of_rows(result.stdout)
    assert n == meta["metrics"]["test_lt@train"]["n"]
    assert abs(top1 - meta["metrics"]["test_lt@train"]["top1"]) <= max(0.003, 2 / n) + 1e-9
    bad = invoke(["predict", model, run["manifest"], "--target-prior", tmp_path / "missing.json"])
    assert bad.exit_code != 0 and "no such prior file" in bad.output


def test_the_saved_model_embeds_as_stage_one_did(run):
    """Backbone weights and preprocessing are the extraction run's: the first
    test images embed to their cached (float16) rows."""
    model = decouple.load_model(run["best"])
    refs = read_manifest(run["manifest"]).splits["test"].refs[:8]
    transform = model.transform()
    images = torch.stack([transform(Image.open(ref).convert("RGB")) for ref in refs])
    with torch.no_grad():
        embedded = model.embed(images).numpy()
    cached = read_features(run["features"]).splits["test"].features[:8].astype(np.float32)
    np.testing.assert_allclose(embedded, cached, rtol=2e-3, atol=2e-3 * np.abs(cached).max())


def test_python_api_takes_paths_and_pil_images(run):
    model = decouple.load_model(run["best"])
    refs = read_manifest(run["manifest"]).splits["test"].refs[:3]
    by_path = decouple.predict(model, refs, top_k=3)
    by_image = decouple.predict(model, [Image.open(ref) for ref in refs], top_k=3)
    assert [row["labels"] for row in by_path] == [row["labels"] for row in by_image]
    for row in by_path:
        assert row["error"] is None and len(row["labels"]) == 3
        assert row["probabilities"] == sorted(row["probabilities"], reverse=True)
        assert 0 < sum(row["probabilities"]) <= 1 + 1e-6
        assert set(row["labels"]) <= set(model.class_names)


# --------------------------------------------------------------------------- bad input


def test_predict_writes_an_error_row_for_each_bad_file_and_exits_1(run, cifar_subset, tmp_path):
    folder = tmp_path / "new"
    (folder / "sub").mkdir(parents=True)
    good = sorted((cifar_subset / "test" / "cat").iterdir())[:2]
    shutil.copy(good[0], folder / "a.jpg")
    shutil.copy(good[1], folder / "sub" / "b.jpg")
    (folder / "truncated.jpg").write_bytes(good[0].read_bytes()[:400])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image\n")
    out = tmp_path / "predictions.csv"
    result = invoke(["predict", run["best"], folder, "-o", out, "--top-k", "2"])
    assert result.exit_code == 1, result.output
    assert "classified 2 image(s), 3 failed" in result.output
    lines = out.read_text().splitlines()
    assert lines[0] == "path,label_1,probability_1,label_2,probability_2,error"
    rows = {Path(line.split(",")[0]).name: line.split(",") for line in lines[1:]}
    assert set(rows) == {"a.jpg", "b.jpg", "truncated.jpg", "empty.jpg", "notes.txt"}
    for name in ("truncated.jpg", "empty.jpg", "notes.txt"):
        assert rows[name][1] == "" and rows[name][-1]
    for name in ("a.jpg", "b.jpg"):
        assert rows[name][1] in read_model_file(run["best"]).class_names and rows[name][-1] == ""


def test_manifest_labels_must_be_class_names(run, cifar_subset, tmp_path):
    image = sorted((cifar_subset / "test" / "cat").iterdir())[0]
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,label\n{image},3\n")
    result = invoke(["predict", run["best"], manifest, "-o", tmp_path / "out.csv"])
    assert result.exit_code == 2 and "'3' is not one of the model's classes" in result.output
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("make", ["missing", "text", "other_torch_file", "pickle"])
def test_a_missing_or_invalid_model_file_is_exit_2_in_one_line(make, run, tmp_path):
    path = tmp_path / "model.pt"
    if make == "text":
        path.write_text("hello\n")
    elif make == "other_torch_file":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif make == "pickle":
        torch.save({"format": FORMAT, "version": 1, "meta": object()}, path)
    result = invoke(["predict", path, run["manifest"]])
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert "\n" not in message and str(path) in message and "Traceback" not in message


def test_head_save_model_without_the_checkpoint_needs_the_weights(run, tmp_path):
    moved = tmp_path / "cifar.h5"
    shutil.copy(run["features"], moved)
    result = invoke(["head", "--features", moved, "--save-model", tmp_path / "m.pt"])
    assert result.exit_code == 2 and "--backbone-weights" in result.output
    assert not (tmp_path / "m.pt").exists()
    checkpoint = run["features"].with_name("cifar.ckpt.pt")
    result = invoke(["head", "--features", moved, "--save-model", tmp_path / "m.pt", "--backbone-weights", checkpoint])
    assert result.exit_code == 0, result.output
    wrong = tmp_path / "wrong.pt"
    state = torch.load(checkpoint, weights_only=True)["model"]
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, wrong)
    result = invoke(["head", "--features", moved, "--save-model", tmp_path / "w.pt", "--backbone-weights", wrong])
    assert result.exit_code == 2 and "different weights" in result.output


def test_a_frozen_run_is_rebuilt_from_its_seed(cifar_subset, tmp_path):
    extract = invoke([
        "extract", "--data", cifar_subset, "--backbone", "test_resnet", "--imbalance", "10", "--val-per-class", "2",
        "--epochs", "0", "--features-dir", tmp_path, "--name", "frozen", "--no-progress",
    ])
    assert extract.exit_code == 0, extract.output
    assert not (tmp_path / "frozen.ckpt.pt").exists()
    result = invoke(["head", "--features", tmp_path / "frozen.h5", "--head", "ncm", "--save-model", tmp_path / "m.pt"])
    assert result.exit_code == 0, result.output
    meta = read_model_file(tmp_path / "m.pt").meta
    assert meta["backbone"]["weights_source"] == "frozen backbone, seeded random"


# --------------------------------------------------------------------------- portable export


def test_torchscript_runs_in_a_process_that_imports_only_torch(run, tmp_path):
    path = tmp_path / "model.ts"
    result = invoke(["save-model", "--db", run["db"], "-o", path, "--format", "torchscript"])
    assert result.exit_code == 0, result.output
    model = decouple.load_model(run["best"])
    images = torch.randn(3, *model.input_size, generator=torch.Generator().manual_seed(1))
    torch.save(images, tmp_path / "images.pt")
    with torch.no_grad():
        expected = model(images)
    script = textwrap.dedent(f"""
        import json, sys, torch
        extra = {{"decouple.json": ""}}
        model = torch.jit.load({str(path)!r}, _extra_files=extra)
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / 'images.pt')!r}))
        torch.save(logits, {str(tmp_path / 'logits.pt')!r})
        meta = json.loads(extra["decouple.json"])
        print(json.dumps({{"classes": meta["class_names"],
                          "foreign": sorted(m for m in sys.modules if m.split(".")[0] in ("decouple", "timm"))}}))
    """)
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["foreign"] == [] and report["classes"] == model.class_names
    np.testing.assert_allclose(torch.load(tmp_path / "logits.pt").numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_onnx_export_gives_the_same_logits(run, tmp_path):
    pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    result = invoke(["save-model", "--db", run["db"], "-o", path, "--format", "onnx"])
    assert result.exit_code == 0, result.output
    model = decouple.load_model(run["best"])
    images = torch.randn(5, *model.input_size, generator=torch.Generator().manual_seed(2))  # another batch size
    with torch.no_grad():
        expected = model(images).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"images": images.numpy()})[0], expected, rtol=1e-4, atol=1e-4)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["decouple"])["class_names"] == model.class_names


# --------------------------------------------------------------------------- selection and bad input, no images


def _record(head, loss, seed, val, *, ece=0.1):
    from decouple.study.store import CellRecord

    return CellRecord(
        cell_key=f"{head}-{loss}-{seed}", config_hash="c", features="f.h5", features_name="f", features_sha256="s",
        head=head, loss=loss, sampler="instance", seed=seed, params={"head": {}, "loss": {}, "sampler": {}},
        train={"precision": "float32"}, class_names=["a", "b"], train_counts=[10, 2],
        metrics={"val": {"n": 4, "mean_class_acc": val, "ece": ece, "per_class": [val, val]},
                 "test": {"n": 4, "mean_class_acc": 1.0 - val, "per_class": [0.0, 0.0]}},
        fit_seconds=0.1,
    )


def test_selection_takes_the_best_mean_over_seeds_then_its_best_seed(monkeypatch):
    """The single best cell (focal, seed 1) belongs to the method with the
    worse mean; test scores, inverted here, play no part."""
    import decouple.study.ranking as ranking
    import decouple.study.select as select

    records = [_record("linear", "ce", 0, 0.80), _record("linear", "ce", 1, 0.84),
               _record("linear", "focal", 0, 0.70), _record("linear", "focal", 1, 0.90)]
    monkeypatch.setattr(ranking, "load_records", lambda db, features=None, predictions=False: records)
    chosen, selection = select.select_record("db")
    assert chosen.cell_key == "linear-ce-1"
    assert selection["method_mean"] == pytest.approx(0.82) and selection["method_seeds"] == 2
    assert selection["methods_compared"] == 2 and selection["goal"] == "highest"
    records[1].metrics["val"]["ece"] = 0.01  # the lowest ECE wins when selecting on ece
    chosen, selection = select.select_record("db", metric="ece")
    assert chosen.cell_key == "linear-ce-1" and selection["goal"] == "lowest"
    with pytest.raises(decouple.errors.DecoupleError, match="not a single number"):
        select.select_record("db", metric="per_class")
    with pytest.raises(decouple.errors.DecoupleError, match="never on test"):
        select.select_record("db", split="test")


def test_a_diverged_head_still_scores_without_calibration():
    from decouple.metrics import evaluate

    result = evaluate(np.array([0, 1, 2, 0]), np.full((4, 3), np.nan), np.array([50, 30, 5]))
    assert result["top1"] is not None and result["ece"] is None and result["nll_raw"] is None


@pytest.mark.parametrize("damage, message", [
    (lambda meta, scorer: meta["temperature"].update(value="hot"), "temperature"),
    (lambda meta, scorer: meta["temperature"].update(value=float("inf")), "temperature"),
    (lambda meta, scorer: meta.update(preprocess={}), "preprocess lacks"),
    (lambda meta, scorer: meta.update(class_names=meta["class_names"][:-1]), "scores per image"),
    (lambda meta, scorer: scorer.update(weight=scorer["weight"][:, :-1]), "does not run"),
])
def test_a_model_file_with_bad_contents_is_exit_2_in_one_line(run, tmp_path, damage, message):
    model = run["best"]
    if message == "does not run":  # a head with a weight matrix to damage, whichever head val chose
        model = tmp_path / "linear.pt"
        saved = invoke(["head", "--features", run["features"], "--head", "linear", "--loss", "ce",
                        "--save-model", model])
        assert saved.exit_code == 0, saved.output
    archive = torch.load(model, map_location="cpu", weights_only=True)
    meta = json.loads(archive["meta"])
    damage(meta, archive["scorer"])
    archive["meta"] = json.dumps(meta)
    path = tmp_path / "damaged.pt"
    torch.save(archive, path)
    result = invoke(["predict", path, run["manifest"]])
    assert result.exit_code == 2, result.output
    assert message in result.output and "\n" not in result.output.strip()


@pytest.mark.parametrize("device", ["foo", "cuda:7"])
def test_a_device_that_does_not_exist_is_exit_2(run, device):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    result = invoke(["predict", run["best"], run["manifest"], "--device", device])
    assert result.exit_code == 2 and "--device" in result.output


def test_every_result_and_csv_row_names_its_shot_group_rule(gaussian_feature_set):
    from decouple.stage_two.cells import Cell
    from decouple.stage_two.config import TrainConfig
    from decouple.stage_two.fit import fit_cell
    from decouple.study.export import cells_csv

    result = fit_cell(gaussian_feature_set, Cell("ncm"), train=TrainConfig(groups="thirds"))
    assert result.params["shot_groups"]["rule"] == "thirds"
    import csv
    import io

    record = _record("linear", "ce", 0, 0.8)
    rows = list(csv.DictReader(io.StringIO(cells_csv([record]))))
    assert {row["groups"] for row in rows} == {"many>100,few<20"}
    record.train["groups"] = "thirds"
    assert {row["groups"] for row in csv.DictReader(io.StringIO(cells_csv([record])))} == {"thirds"}


def test_a_head_without_a_scorer_is_refused_before_fitting(gaussian_features, monkeypatch, tmp_path):
    from decouple.deploy.save import fit_head_file
    from decouple.stage_two import heads
    from decouple.stage_two.cells import Cell

    monkeypatch.setattr(heads.NCMHead, "scorer", heads.Head.scorer)
    monkeypatch.setattr(heads.NCMHead, "fit", lambda *a, **k: pytest.fail("fitted before the check"))
    with pytest.raises(decouple.errors.ConfigError, match="cannot be saved as a model"):
        fit_head_file(gaussian_features, Cell("ncm"), save_to=tmp_path / "m.pt")
