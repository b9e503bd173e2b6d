"""Split health (decouple.split_health): near-duplicates found with their
training rows, the class-stratified leak test, `decouple info` (JSON keys,
--duplicates CSV) and the warning `decouple extract` logs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from decouple.features import FeatureSet, Split, write_features
from decouple.profiles import exponential_counts
from decouple.split_health import DUPLICATES_HEADER, split_health, stratified_closeness

NUM_CLASSES, DIM = 10, 32
PLANTED = 30


def draw(rng, means, labels, noise=1.0):
    return (means[labels] + noise * rng.standard_normal((len(labels), means.shape[1]))).astype(np.float32)


def class_means(rng, num_classes=NUM_CLASSES, dim=DIM, radius=3.0):
    directions = rng.standard_normal((num_classes, dim))
    return radius * directions / np.linalg.norm(directions, axis=1, keepdims=True)


def planted_set(seed=0):
    """Gaussian classes; val = 100 clean rows then PLANTED near-copies (noise
    0.01 of the class spread) of seeded training rows; test clean. Returns
    (FeatureSet, planted val rows, their training rows)."""
    rng = np.random.default_rng(seed)
    means = class_means(rng)
    train_labels = np.repeat(np.arange(NUM_CLASSES), 200)
    train = draw(rng, means, train_labels)
    sources = rng.choice(len(train_labels), size=PLANTED, replace=False)
    clean_labels = np.repeat(np.arange(NUM_CLASSES), 10)
    val = np.concatenate([draw(rng, means, clean_labels), train[sources] + 0.01 * rng.standard_normal((PLANTED, DIM))])
    val_labels = np.concatenate([clean_labels, train_labels[sources]])
    test_labels = np.repeat(np.arange(NUM_CLASSES), 50)
    feature_set = FeatureSet(
        class_names=[f"c{c}" for c in range(NUM_CLASSES)],
        splits={
            "train": Split(train, train_labels),
            "val": Split(val.astype(np.float32), val_labels),
            "test": Split(draw(rng, means, test_labels), test_labels),
        },
        backbone="synthetic",
    )
    return feature_set, np.arange(100, 100 + PLANTED), sources


@pytest.fixture(scope="module")
def planted():
    return planted_set()


@pytest.fixture(scope="module")
def planted_file(planted, tmp_path_factory):
    return str(write_features(tmp_path_factory.mktemp("health") / "planted.h5", planted[0]))


def pairs_of(report, name):
    found = report.pairs[name]
    return set(zip(found.index.tolist(), found.train_index.tolist()))


# --------------------------------------------------------------------------- near-duplicates


def test_planted_copies_are_found_with_their_training_rows(planted):
    feature_set, rows, sources = planted
    report = split_health(feature_set)
    assert set(zip(rows.tolist(), sources.tolist())) <= pairs_of(report, "val")
    assert all(row >= 100 for row, _ in pairs_of(report, "val")), "a clean val row called a duplicate"
    assert report.splits["val"]["near_duplicates"] == PLANTED
    assert report.splits["test"]["near_duplicates"] <= 0.01 * 500
    assert report.splits["val"]["flagged"] and not report.splits["test"]["flagged"]
    assert report.flagged == ["val"]
    assert "30 of its 130 images" in report.warnings()[0] and report.warnings()[0].startswith("warning: val")


def test_a_copy_of_a_burst_in_train_is_paired_with_every_frame():
    rng = np.random.default_rng(1)
    means = class_means(rng)
    labels = np.repeat(np.arange(NUM_CLASSES), 100)
    train = draw(rng, means, labels)
    # train rows 0, 1 and 2 are three frames of one object; val row 0 is a fourth
    frames = train[0] + 0.01 * rng.standard_normal((4, DIM))
    train[:3] = frames[:3]
    labels[:3] = labels[0]
    val = np.concatenate([frames[3:], draw(rng, means, labels[::10])])
    feature_set = FeatureSet(
        [f"c{c}" for c in range(NUM_CLASSES)],
        {"train": Split(train, labels), "val": Split(val.astype(np.float32), np.concatenate([labels[:1], labels[::10]]))},
    )
    report = split_health(feature_set)
    assert {(0, 0), (0, 1), (0, 2)} <= pairs_of(report, "val")
    assert report.splits["val"]["near_duplicates"] <= 2


def test_few_shot_classes_are_not_taken_for_copies():
    """Tight, well-separated classes (a trained network's) with tail classes of
    one to three training images: each tail test image has its class's few
    training images far ahead of every other, yet is no copy of them. The
    floor relative to train keeps them out (without it: over 500 of 2,000)."""
    rng = np.random.default_rng(0)
    num_classes, dim = 50, 64
    means = class_means(rng, num_classes, dim, radius=1.0)
    counts = exponential_counts(200, num_classes, 200)
    train_labels = np.repeat(np.arange(num_classes), counts)
    test_labels = np.repeat(np.arange(num_classes), 40)
    noise = 0.05 * 4 / np.sqrt(dim)
    feature_set = FeatureSet(
        [f"c{c}" for c in range(num_classes)],
        {
            "train": Split(draw(rng, means, train_labels, noise), train_labels),
            "test": Split(draw(rng, means, test_labels, noise), test_labels),
        },
    )
    report = split_health(feature_set)
    assert counts.min() == 1
    assert report.splits["test"]["near_duplicate_fraction"] < 0.01
    assert not report.splits["test"]["flagged"]


# --------------------------------------------------------------------------- the leak test


def leak_set(*, leaky: bool, seed=0):
    rng = np.random.default_rng(seed)
    means = class_means(rng)
    train_labels = np.repeat(np.arange(NUM_CLASSES), 200)
    train = draw(rng, means, train_labels)
    test_labels = np.repeat(np.arange(NUM_CLASSES), 50)
    if leaky:  # near training images (a third of the class spread away), never a copy of one
        sources = rng.choice(len(train), size=300, replace=False)
        val, val_labels = train[sources] + 0.6 * rng.standard_normal((300, DIM)), train_labels[sources]
    else:
        val_labels = np.repeat(np.arange(NUM_CLASSES), 30)
        val = draw(rng, means, val_labels)
    return FeatureSet(
        [f"c{c}" for c in range(NUM_CLASSES)],
        {
            "train": Split(train, train_labels),
            "val": Split(val.astype(np.float32), val_labels),
            "test": Split(draw(rng, means, test_labels), test_labels),
        },
    )


def test_a_leaky_val_is_closer_than_test_and_an_iid_one_is_not():
    leaky = split_health(leak_set(leaky=True))
    val = leaky.splits["val"]
    assert val["leak_tests"]["test"]["closer"] and val["leak_tests"]["test"]["auc"] > 0.8
    assert val["flagged"] and any("closer to train than test" in reason for reason in val["reasons"])
    assert val["one_nn_accuracy"] > leaky.splits["test"]["one_nn_accuracy"]
    assert not leaky.splits["test"]["flagged"]
    iid = split_health(leak_set(leaky=False))
    assert not iid.splits["val"]["leak_tests"]["test"]["closer"]
    assert 0.4 < iid.splits["val"]["leak_tests"]["test"]["auc"] < 0.6
    assert iid.flagged == []


def test_the_leak_test_compares_within_classes():
    """A split whose images come mostly from head classes (test_lt) sits closer
    to train than a balanced one overall, though no image is closer than one
    of its own class: stratified, it is not flagged."""
    rng = np.random.default_rng(0)
    means = class_means(rng)
    counts = exponential_counts(500, NUM_CLASSES, 100)
    train_labels = np.repeat(np.arange(NUM_CLASSES), counts)
    test_labels = np.repeat(np.arange(NUM_CLASSES), 100)
    test_lt_labels = np.repeat(np.arange(NUM_CLASSES), exponential_counts(200, NUM_CLASSES, 100))
    feature_set = FeatureSet(
        [f"c{c}" for c in range(NUM_CLASSES)],
        {
            "train": Split(draw(rng, means, train_labels), train_labels),
            "test": Split(draw(rng, means, test_labels), test_labels),
            "test_lt": Split(draw(rng, means, test_lt_labels), test_lt_labels),
        },
    )
    report = split_health(feature_set)
    nn = {name: split_health(feature_set, splits=[name]) for name in ("test", "test_lt")}
    assert nn["test_lt"].splits["test_lt"]["nn_cosine_median"] > nn["test"].splits["test"]["nn_cosine_median"]
    assert not report.splits["test_lt"]["leak_tests"]["test"]["closer"]
    assert report.flagged == []


def test_stratified_closeness_on_one_class_is_scipys_mann_whitney():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    a = np.round(rng.normal(0.3, 1.0, 70), 1)  # rounded: ties
    b = np.round(rng.normal(0.0, 1.0, 90), 1)
    ours = stratified_closeness(a, np.zeros(70, int), b, np.zeros(90, int))
    theirs = scipy_stats.mannwhitneyu(a, b, alternative="greater", method="asymptotic", use_continuity=False)
    assert ours["auc"] == pytest.approx(theirs.statistic / (70 * 90))
    assert ours["p_value"] == pytest.approx(theirs.pvalue, rel=1e-9)
    # a class present in one sample only is left out
    more = stratified_closeness(np.append(a, 9.0), np.append(np.zeros(70, int), 1), b, np.zeros(90, int))
    assert more["p_value"] == pytest.approx(ours["p_value"]) and more["classes"] == 1


# --------------------------------------------------------------------------- what can be reported


def test_without_two_held_out_splits_only_duplicates_flag(planted):
    feature_set, _, _ = planted
    only_val = FeatureSet(feature_set.class_names, {name: feature_set.splits[name] for name in ("train", "val")})
    report = split_health(only_val)
    assert report.splits["val"]["leak_tests"] == {} and report.splits["val"]["flagged"]
    assert any("only held-out split" in note for note in report.notes)
    only_train = FeatureSet(feature_set.class_names, {"train": feature_set.splits["train"]})
    assert split_health(only_train).splits == {} and split_health(only_train).notes
    no_train = FeatureSet(feature_set.class_names, {"val": feature_set.splits["val"]})
    assert split_health(no_train).splits == {}


def test_a_one_image_train_split_reports_without_a_ratio_test():
    rng = np.random.default_rng(0)
    one = FeatureSet(["a"], {
        "train": Split(rng.standard_normal((1, 4)).astype(np.float32), np.zeros(1, int)),
        "val": Split(rng.standard_normal((5, 4)).astype(np.float32), np.zeros(5, int)),
    })
    report = split_health(one)
    assert report.splits["val"]["one_nn_accuracy"] == 1.0
    assert report.splits["val"]["near_duplicates"] == 0


def test_chunked_search_gives_the_same_report(planted):
    feature_set, _, _ = planted
    whole, chunked = split_health(feature_set), split_health(feature_set, chunk=7)
    assert whole.splits == chunked.splits
    assert pairs_of(whole, "val") == pairs_of(chunked, "val")


# --------------------------------------------------------------------------- decouple info


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def test_info_json_reports_split_health(planted_file):
    result = invoke("info", planted_file, "--json")
    assert result.exit_code == 0, result.output
    health = json.loads(result.stdout)["split_health"]
    assert list(health) == ["val", "test"]
    for name, flagged in (("val", True), ("test", False)):
        split = health[name]
        assert isinstance(split["nn_cosine_median"], float) and -1 <= split["nn_cosine_median"] <= 1
        assert isinstance(split["one_nn_accuracy"], float) and 0 <= split["one_nn_accuracy"] <= 1
        assert isinstance(split["near_duplicates"], int) and not isinstance(split["near_duplicates"], bool)
        assert split["flagged"] is flagged
    assert health["val"]["near_duplicates"] == PLANTED
    text = invoke("info", planted_file)
    assert text.exit_code == 0 and "split health" in text.output
    assert "FLAGGED" in text.output and "why val is flagged" in text.output
    assert "split_health" not in json.loads(invoke("info", planted_file, "--json", "--no-health").stdout)


def test_info_duplicates_writes_the_pairs(planted, planted_file, tmp_path):
    _, rows, sources = planted
    out = tmp_path / "pairs" / "duplicates.csv"
    result = invoke("info", planted_file, "--duplicates", str(out))
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0] == DUPLICATES_HEADER == "split,index,train_index,cosine"
    records = list(csv.DictReader(lines))
    val = {(int(r["index"]), int(r["train_index"])) for r in records if r["split"] == "val"}
    assert val == set(zip(rows.tolist(), sources.tolist()))
    assert all(0.99 < float(r["cosine"]) <= 1.0 for r in records if r["split"] == "val")
    assert {r["split"] for r in records} <= {"val", "test"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["duplicates.csv"]  # no temporary file left


def test_info_duplicates_without_health_is_one_line_exit_2(planted_file, tmp_path):
    out = tmp_path / "duplicates.csv"
    result = invoke("info", planted_file, "--no-health", "--duplicates", str(out))
    assert result.exit_code == 2 and "--duplicates" in result.output
    assert not out.exists()


# --------------------------------------------------------------------------- decouple extract


@pytest.mark.usefixtures("one_torch_thread")
def test_extract_warns_about_a_leaky_val(cifar_subset, tmp_path):
    """val holds copies of training images (a leak a careless split makes);
    test is CIFAR-10's own test images."""
    from decouple.stage_one.extract import ExtractConfig, run_extract
    from decouple.stage_one.finetune import FinetuneConfig

    data = tmp_path / "data"
    for folder in sorted((cifar_subset / "train").iterdir()):
        for split in ("train", "val", "test"):
            (data / split / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:10]:
            shutil.copy(image, data / "train" / folder.name / image.name)
        for image in sorted(folder.iterdir())[:5]:
            shutil.copy(image, data / "val" / folder.name / f"copy_{image.name}")
        for image in sorted((cifar_subset / "test" / folder.name).iterdir())[:10]:
            shutil.copy(image, data / "test" / folder.name / image.name)
    messages = []
    result = run_extract(
        ExtractConfig(data=str(data), backbone="test_resnet", features_dir=str(tmp_path / "features"),
                      finetune=FinetuneConfig(epochs=0, batch_size=32, progress=False)),
        log=messages.append,
    )
    assert result.splits == {"train": 100, "val": 50, "test": 100}
    warnings = [m for m in messages if m.startswith("warning:")]
    assert len(warnings) == 1, messages
    assert warnings[0].startswith("warning: val looks leaky") and "50 of its 50 images" in warnings[0]
    assert "\n" not in warnings[0]


# --------------------------------------------------------------------------- image fingerprints


def test_fingerprints_match_flipped_and_reencoded_copies_and_tell_photos_apart(cifar_subset):
    """On real CIFAR-10 JPEGs: a mirror image's hash is its source's mirrored
    hash, bit for bit; a JPEG re-encoding at quality 30 stays within
    FINGERPRINT_BITS; distinct photographs almost never come that close."""
    import io

    from PIL import Image

    from decouple.split_health import FINGERPRINT_BITS
    from decouple.stage_one.images import image_fingerprints

    def bits(a, b):
        return bin(int(a) ^ int(b)).count("1")

    files = sorted((cifar_subset / "train").glob("*/*.jpg"))
    hashes = []
    for path in files:
        with Image.open(path) as image:
            image = image.convert("RGB")
        own, mirrored = image_fingerprints(image)
        flipped = image_fingerprints(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        assert (flipped[0], flipped[1]) == (mirrored, own)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=30)
        assert bits(image_fingerprints(Image.open(buffer))[0], own) <= FINGERPRINT_BITS
        hashes.append(own)
    # At a size the box resize does not divide evenly, a flip still hashes to the mirror exactly.
    odd = image.resize((100, 37))
    assert image_fingerprints(odd.transpose(Image.Transpose.FLIP_LEFT_RIGHT))[0] == image_fingerprints(odd)[1]
    distances = [bits(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]]
    assert np.mean(np.array(distances) <= FINGERPRINT_BITS) < 0.005
    assert 24 <= np.median(distances) <= 40  # about half of the 63 bits


def test_fingerprints_find_copies_the_embeddings_do_not_show():
    """Copies whose embeddings say nothing (drawn afresh from their class) are
    found by their fingerprints, with their training rows; the pairs' cosine
    is that of their embeddings."""
    feature_set, planted_rows, sources = planted_set(seed=3)
    rng = np.random.default_rng(4)
    val, train = feature_set.splits["val"], feature_set.splits["train"]
    fresh = val.features.copy()
    fresh[planted_rows] = (train.features[sources] + 3.0 * rng.standard_normal((PLANTED, DIM))).astype(np.float32)

    def random_hashes(n):
        return rng.integers(0, 2**63, size=(n, 2), dtype=np.int64).astype(np.uint64)

    train_hashes, val_hashes, test_hashes = random_hashes(len(train)), random_hashes(len(val)), random_hashes(500)
    half = PLANTED // 2  # half the copies mirrored, half with 3 bits changed
    val_hashes[planted_rows[:half], 0] = train_hashes[sources[:half], 1]
    val_hashes[planted_rows[half:], 0] = train_hashes[sources[half:], 0] ^ np.uint64(0b10101)
    sets = {
        "train": Split(train.features, train.labels, train_hashes),
        "val": Split(fresh, val.labels, val_hashes),
        "test": Split(feature_set.splits["test"].features, feature_set.splits["test"].labels, test_hashes),
    }
    report = split_health(FeatureSet(feature_set.class_names, sets, backbone="synthetic"))
    assert report.criteria["duplicates_by"] == "image fingerprints"
    assert pairs_of(report, "val") == set(zip(planted_rows.tolist(), sources.tolist()))
    assert report.splits["test"]["near_duplicates"] == 0 and report.splits["val"]["flagged"]
    found = report.pairs["val"]
    expected = np.einsum("ij,ij->i", *(block / np.linalg.norm(block, axis=1, keepdims=True)
                                       for block in (fresh[found.index], train.features[found.train_index])))
    np.testing.assert_allclose(found.cosine, expected, rtol=1e-5)
    # Without fingerprints on every split the embeddings decide, and miss these copies.
    sets["test"] = Split(sets["test"].features, sets["test"].labels)
    embeddings_only = split_health(FeatureSet(feature_set.class_names, sets, backbone="synthetic"))
    assert embeddings_only.criteria["duplicates_by"] == "embeddings"
    assert len(pairs_of(embeddings_only, "val") & set(zip(planted_rows.tolist(), sources.tolist()))) < PLANTED // 2
