"""The fine-tuned network's own head: `decouple extract` stores its linear
classifier as /classifier, the feature file reads it back, and the
training-free head `finetuned` scores with it, giving the network's own
predictions, with the prior stage one trained it under."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms as T
import yaml
from click.testing import CliRunner
from PIL import Image

import decouple
from cli.main import cli
from decouple.errors import ConfigError, FeatureFileError
from decouple.features import Classifier, FeatureSet, read_classifier, read_features, write_features
from decouple.predictions import SplitPredictions
from decouple.stage_one.backbones import create_backbone
from decouple.stage_one.extract import own_classifier
from decouple.stage_one.finetune import FinetuneConfig, data_config_for, make_transform
from decouple.stage_one.manifest import SplitItems, read_manifest
from decouple.stage_two.cells import Cell
from decouple.stage_two.fit import fit_cell
from decouple.stage_two.heads import create_head
from decouple.stage_two.losses import log_prior
from decouple.stage_two.priors import log_uniform
from decouple.study.store import ResultStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def invoke(args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def with_classifier(feature_set: FeatureSet, *, loss="ce", sampler="instance", trained=True, seed=0) -> FeatureSet:
    """``feature_set`` with a random classifier (C, D) as if stage one had trained it."""
    rng = np.random.default_rng(seed)
    classifier = Classifier(
        weight=rng.normal(size=(feature_set.num_classes, feature_set.dim)).astype(np.float32),
        bias=rng.normal(size=feature_set.num_classes).astype(np.float32),
        loss=loss, sampler=sampler, trained=trained, epochs=3,
    )
    return dataclasses.replace(feature_set, classifier=classifier)


# --------------------------------------------------------------------------- the head on cached features


def test_the_scores_are_the_classifier_on_the_features(gaussian_feature_set):
    feature_set = with_classifier(gaussian_feature_set)
    weight, bias = feature_set.classifier.weight, feature_set.classifier.bias
    result = fit_cell(feature_set, Cell("finetuned"), keep_head=True)
    assert (result.loss, result.sampler) == (None, None)  # training-free: no loss, no sampler
    head = result.fitted_head
    for name in ("val", "test"):
        split = feature_set.splits[name]
        expected = split.features.astype(np.float64) @ weight.T.astype(np.float64) + bias
        scores = head.decision_function(split.features)
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(SplitPredictions.from_json(result.to_json()["predictions"][name]).predicted,
                                      expected.argmax(axis=1))
        assert result.metrics[name]["top1"] == np.mean(expected.argmax(axis=1) == split.labels)
    with torch.no_grad():
        scored = head.scorer()(torch.from_numpy(feature_set.splits["test"].features)).numpy()
    np.testing.assert_allclose(scored, head.decision_function(feature_set.splits["test"].features), rtol=1e-6, atol=1e-5)
    assert result.params["stage_one"] == {"loss": "ce", "sampler": "instance", "trained": True}


@pytest.mark.parametrize("loss, sampler, trained, expected", [
    ("ce", "instance", True, "train"),
    ("balanced_softmax", "instance", True, "uniform"),  # the loss balances the prior
    ("ldam", "instance", True, "uniform"),
    ("ce", "class_balanced", True, "uniform"),  # the sampler showed a uniform prior
    ("ce", "square_root", True, "sampler:square_root"),
    ("ce", "instance", False, "uniform"),  # a frozen run's classifier learned no prior
])
def test_it_assumes_the_prior_stage_one_trained_it_under(gaussian_feature_set, loss, sampler, trained, expected):
    feature_set = with_classifier(gaussian_feature_set, loss=loss, sampler=sampler, trained=trained)
    result = fit_cell(feature_set, Cell("finetuned"), keep_head=True)
    assert result.params["prior"]["assumed"] == expected
    counts = feature_set.train_counts
    prior = result.fitted_head.assumed_prior(None, None, counts)
    if expected == "train":
        np.testing.assert_allclose(prior.log_probabilities, log_prior(counts), rtol=1e-12)
    elif expected == "uniform":
        np.testing.assert_allclose(prior.log_probabilities, log_uniform(len(counts)), rtol=1e-12)
    else:
        np.testing.assert_allclose(prior.log_probabilities, np.log(np.sqrt(counts) / np.sqrt(counts).sum()), rtol=1e-9)


def test_the_classifier_round_trips_through_the_feature_file(gaussian_feature_set, tmp_path):
    feature_set = with_classifier(gaussian_feature_set, loss="logit_adjusted", sampler="square_root")
    path = write_features(tmp_path / "own.h5", feature_set)
    for read in (read_classifier(path), read_features(path).classifier):
        np.testing.assert_array_equal(read.weight, feature_set.classifier.weight)
        np.testing.assert_array_equal(read.bias, feature_set.classifier.bias)
        assert (read.loss, read.sampler, read.trained, read.epochs) == ("logit_adjusted", "square_root", True, 3)
    assert read_classifier(write_features(tmp_path / "none.h5", gaussian_feature_set)) is None


def test_a_classifier_of_the_wrong_shape_is_refused(gaussian_feature_set, tmp_path):
    feature_set = with_classifier(gaussian_feature_set)
    feature_set.classifier.weight = feature_set.classifier.weight[:, :-1]
    path = write_features(tmp_path / "bad.h5", feature_set)
    with pytest.raises(FeatureFileError, match=r"bad.h5: /classifier/weight must be float \(20, 32\)"):
        read_features(path)


def test_a_file_without_a_classifier_is_refused_in_one_line(gaussian_features, gaussian_feature_set):
    result = invoke(["head", "--features", gaussian_features, "--head", "finetuned", "--json"])
    assert result.exit_code == 2
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and message.startswith("Error: ")
    assert f"{gaussian_features}: no /classifier; head finetuned" in message
    with pytest.raises(FeatureFileError, match="no /classifier"):
        fit_cell(gaussian_feature_set, Cell("finetuned"))
    with pytest.raises(ConfigError, match="needs the fine-tuned network's classifier"):
        create_head("finetuned").fit(gaussian_feature_set.splits["train"].features,
                                     gaussian_feature_set.splits["train"].labels)
    training_free = invoke(["head", "--features", gaussian_features, "--head", "finetuned", "--loss", "ce"])
    assert training_free.exit_code == 2 and "training-free and takes no loss" in training_free.output


# --------------------------------------------------------------------------- extract writes it


class _ToyNet(nn.Module):
    """A timm-like network: embedding = the first 4 pixel means, logits = fc(embedding) * ``scale``."""

    def __init__(self, classifier: nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.fc, self.scale = classifier, scale

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_features(self, x):
        return x.mean(dim=(2, 3)).repeat(1, 2)[:, :4]

    def forward_head(self, x, pre_logits=False):
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x)) * self.scale


def test_extract_keeps_only_a_classifier_that_gives_the_networks_logits(tmp_path):
    refs = []
    for index in range(3):
        refs.append(str(tmp_path / f"{index}.png"))
        Image.fromarray(np.full((8, 8, 3), 40 * index, dtype=np.uint8)).save(refs[-1])
    items = SplitItems(refs, np.array([0, 1, 2]))
    settings = FinetuneConfig(epochs=2, loss="focal", sampler="class_balanced")
    lines = []
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    kept = own_classifier(_ToyNet(linear), items, T.ToTensor(), settings, device=torch.device("cpu"), say=lines.append)
    np.testing.assert_array_equal(kept.weight, linear.weight.detach().numpy())
    np.testing.assert_array_equal(kept.bias, linear.bias.detach().numpy())
    assert (kept.loss, kept.sampler, kept.trained, kept.epochs) == ("focal", "class_balanced", True, 2)
    assert lines == []
    assert own_classifier(_ToyNet(linear, scale=2.0), items, T.ToTensor(), settings, device=torch.device("cpu"),
                          say=lines.append) is None
    assert own_classifier(_ToyNet(nn.Identity()), items, T.ToTensor(), settings, device=torch.device("cpu"),
                          say=lines.append) is None
    assert len(lines) == 2 and all(line.startswith("classifier: not written (") for line in lines)
    assert "Identity, not one affine map" in lines[1]
    frozen = FinetuneConfig(epochs=0)
    assert own_classifier(_ToyNet(linear), items, T.ToTensor(), frozen, device=torch.device("cpu"),
                          say=lines.append) is None
    assert "--epochs 0" in lines[-1]


class _ConvHead(nn.Module):
    """timm's ResNetV2 head: a 1 x 1 convolution on the pooled embedding, then a flatten."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x[:, :, None, None]).flatten(1)


def test_a_one_by_one_convolution_classifier_is_kept_as_its_weight_matrix(tmp_path):
    """resnetv2_50 (one of the study's backbones) classifies with a 1 x 1 Conv2d."""
    refs = []
    for index in range(3):
        refs.append(str(tmp_path / f"{index}.png"))
        Image.fromarray(np.full((8, 8, 3), 40 * index + 10, dtype=np.uint8)).save(refs[-1])
    items = SplitItems(refs, np.array([0, 1, 2]))
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 3, kernel_size=1)
    net = _ToyNet(nn.Linear(4, 3))
    net.fc = _ConvHead(conv)
    net.get_classifier = lambda: conv
    lines = []
    kept = own_classifier(net, items, T.ToTensor(), FinetuneConfig(epochs=1), device=torch.device("cpu"),
                          say=lines.append)
    assert lines == [] and kept.weight.shape == (3, 4)
    np.testing.assert_array_equal(kept.weight, conv.weight.detach().flatten(1).numpy())
    np.testing.assert_array_equal(kept.bias, conv.bias.detach().numpy())


def _tiny_folder(root: Path, *, classes: int = 3, per_class: int = 12) -> Path:
    """``root/<class>/NN.png``: 32-pixel images, a colour per class plus noise."""
    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        colour = np.zeros(3)
        colour[label % 3] = 180.0
        for index in range(per_class):
            pixels = np.clip(colour + rng.normal(0.0, 40.0, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{index:02d}.png")
    return root


def test_extract_writes_the_classifier_and_finetuned_gives_the_networks_own_predictions(tmp_path):
    data = _tiny_folder(tmp_path / "data")
    extract = invoke([
        "extract", "--data", data, "--backbone", "resnet32_cifar", "--epochs", "1", "--batch-size", "8",
        "--val-per-class", "2", "--test-fraction", "0.3", "--dtype", "float32", "--features-dir",
        tmp_path / "features", "--name", "tiny", "--device", "cpu", "--no-progress", "--json",
    ])
    assert extract.exit_code == 0, extract.output
    summary = json.loads(extract.stdout.strip().splitlines()[-1])
    classifier = read_classifier(summary["path"])
    checkpoint = torch.load(summary["checkpoint_path"], map_location="cpu", weights_only=True)["model"]
    np.testing.assert_array_equal(classifier.weight, checkpoint["fc.weight"].numpy())
    np.testing.assert_array_equal(classifier.bias, checkpoint["fc.bias"].numpy())
    assert (classifier.loss, classifier.sampler, classifier.trained) == ("ce", "instance", True)

    saved = tmp_path / "own.pt"
    head = invoke(["head", "--features", summary["path"], "--head", "finetuned", "--json", "--save-model", saved])
    assert head.exit_code == 0, head.output
    record = json.loads(head.stdout.strip().splitlines()[-1])
    assert (record["head"], record["loss"], record["sampler"]) == ("finetuned", None, None)

    # The saved checkpoint's network, on the test images themselves.
    model, _ = create_backbone("resnet32_cifar", num_classes=3)
    model.load_state_dict(checkpoint)
    model.eval()
    test = read_manifest(Path(summary["manifest_path"])).splits["test"]
    transform = make_transform(data_config_for(model, summary["img_size"]), is_training=False)
    with torch.no_grad():
        logits = model(torch.stack([transform(Image.open(ref).convert("RGB")) for ref in test.refs]))
    own = logits.argmax(dim=1).numpy()
    predicted = SplitPredictions.from_json(record["predictions"]["test"]).predicted
    np.testing.assert_array_equal(predicted, own)  # to the image
    assert record["metrics"]["test"]["n"] == len(test.refs)
    assert record["metrics"]["test"]["top1"] == np.mean(own == test.labels)

    # Its model file is the backbone and its own classifier: the network again, from the image files.
    deployed = decouple.load_model(saved)
    assert deployed.meta["method"]["head"] == "finetuned" and deployed.meta["prior"]["assumed"] == "train"
    np.testing.assert_array_equal(deployed.scorer.weight.numpy(), checkpoint["fc.weight"].numpy())
    with torch.no_grad():
        images = torch.stack([deployed.transform()(Image.open(ref).convert("RGB")) for ref in test.refs])
        np.testing.assert_array_equal(deployed(images).argmax(dim=1).numpy(), own)


def test_a_frozen_run_stores_no_classifier_and_finetuned_refuses_it(tmp_path):
    """--epochs 0: the classifier is an initialisation, not a method; no
    /classifier, and the finetuned head says so in one line."""
    data = _tiny_folder(tmp_path / "data", per_class=6)
    extract = invoke([
        "extract", "--data", data, "--backbone", "resnet32_cifar", "--epochs", "0", "--val-per-class", "1",
        "--test-fraction", "0.3", "--features-dir", tmp_path / "features", "--name", "frozen", "--device", "cpu", "--no-progress",
    ])
    assert extract.exit_code == 0, extract.output
    assert "classifier: not written (--epochs 0" in extract.output
    assert read_classifier(tmp_path / "features" / "frozen.h5") is None
    head = invoke(["head", "--features", tmp_path / "features" / "frozen.h5", "--head", "finetuned"])
    assert head.exit_code == 2 and "no /classifier" in head.output


def test_a_sweep_refuses_a_file_without_a_classifier_before_any_cell_runs(gaussian_feature_set, tmp_path):
    """The check runs when the sweep plans, not when it reaches the file:
    one line, exit 2, nothing in the results database."""
    with_one = write_features(tmp_path / "with.h5", with_classifier(gaussian_feature_set))
    without = write_features(tmp_path / "without.h5", gaussian_feature_set)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"features": [str(with_one), str(without)],
                                      "grid": {"head": ["ncm", "finetuned"], "seed": [0]},
                                      "db": str(tmp_path / "results.db")}))
    result = invoke(["sweep", config])
    assert result.exit_code == 2, result.output
    assert "without.h5: no /classifier" in result.output
    if (tmp_path / "results.db").exists():
        with ResultStore.open_existing(tmp_path / "results.db") as store:
            assert store.count() == 0
