"""`decouple extract` end to end on a small CIFAR-10 subset: the file, resume,
two-process DDP, views, frozen features and every bad input."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from cli.main import cli
from decouple.features import read_features
from decouple.profiles import exponential_counts
from decouple.stage_one.extract import ExtractConfig, run_extract, shard_batches
from decouple.stage_one.finetune import FinetuneConfig
from decouple.stage_one.manifest import read_manifest
from decouple.stage_one.splits import SplitOptions

from conftest import PER_CLASS

VENV_BIN = Path(sys.executable).parent


# The CI machine's cores are shared: one intra-op thread avoids oversubscription.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def base_args(data: Path, out_dir: Path, *extra: str) -> list:
    return [
        "extract", "--data", str(data), "--backbone", "test_resnet", "--imbalance", "10",
        "--val-per-class", "2", "--batch-size", "16", "--features-dir", str(out_dir),
        "--no-progress", *extra,
    ]


def config(data: Path, out_dir: Path, *, run: str, epochs: int = 1, **kwargs) -> ExtractConfig:
    return ExtractConfig(
        data=str(data), backbone="test_resnet", split=SplitOptions(imbalance=10, val_per_class=2), features_dir=str(out_dir),
        run=run, finetune=FinetuneConfig(epochs=epochs, batch_size=16, progress=False), **kwargs,
    )


def invoke(args) -> Result:
    return CliRunner().invoke(cli, args)


def leftovers(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# --------------------------------------------------------------------------- the happy path


def test_extract_writes_a_v1_file_that_head_reads(cifar_subset, tmp_path):
    result = invoke(base_args(cifar_subset, tmp_path, "--epochs", "1", "--views", "2", "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    path = Path(summary["path"])
    assert path.name == "cifar10_test_resnet_lt10.h5"
    features = read_features(path)
    assert list(features.splits) == ["train", "val", "test", "test_lt"]
    assert features.backbone == "test_resnet" and features.num_classes == 10
    assert features.splits["train"].features.shape == (summary["splits"]["train"], 96)
    np.testing.assert_array_equal(features.train_counts, exponential_counts(PER_CLASS - 2, 10, 10))
    attrs = features.attrs
    assert json.loads(attrs["config"])["finetune"]["epochs"] == 1
    assert {"torch", "timm", "decouple"} <= set(json.loads(attrs["versions"]))
    assert json.loads(attrs["manifest"])["file"] == "cifar10_test_resnet_lt10.manifest.csv"
    assert attrs["weights_sha256"] == "" and attrs["img_size"] == 32
    manifest = read_manifest(Path(summary["manifest_path"]))
    from decouple.stage_one.images import image_fingerprints, load_image

    for name, split in features.splits.items():
        np.testing.assert_array_equal(split.labels, manifest.splits[name].labels)
        # Each image's fingerprints, in manifest order (for split health's duplicate check).
        for row in (0, len(split) // 2, len(split) - 1):
            np.testing.assert_array_equal(split.fingerprints[row],
                                          image_fingerprints(load_image(manifest.splits[name].refs[row])))
    import h5py

    with h5py.File(path) as handle:
        assert handle["train/features"].dtype == np.float16
        assert handle["train/views"].shape == (summary["splits"]["train"], 2, 96)
    head = invoke(["head", "--features", str(path), "--loss", "balanced_softmax", "--epochs", "2", "--json"])
    assert head.exit_code == 0, head.output
    assert "test_lt" in json.loads(head.stdout.strip().splitlines()[-1])["metrics"]


def test_frozen_features_are_reproducible(cifar_subset, tmp_path):
    first = run_extract(config(cifar_subset, tmp_path, run="a", epochs=0, dtype="float32"), log=lambda m: None)
    second = run_extract(config(cifar_subset, tmp_path, run="b", epochs=0, dtype="float32"), log=lambda m: None)
    assert first.checkpoint_path is None and not (tmp_path / "a.ckpt.pt").exists()
    a, b = read_features(first.path), read_features(second.path)
    for name in a.splits:
        np.testing.assert_array_equal(a.splits[name].features, b.splits[name].features)


def test_resume_after_a_crash_matches_an_uninterrupted_run(cifar_subset, tmp_path, monkeypatch):
    import decouple.stage_one.finetune as finetune_module

    straight = run_extract(config(cifar_subset, tmp_path, run="straight", epochs=2), log=lambda m: None)
    real_save = finetune_module.save_checkpoint

    def save_then_crash(state, path):
        real_save(state, path)
        raise KeyboardInterrupt  # killed right after epoch 1's checkpoint

    monkeypatch.setattr(finetune_module, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_extract(config(cifar_subset, tmp_path, run="crashed", epochs=2), log=lambda m: None)
    assert leftovers(tmp_path).count("crashed.ckpt.pt") == 1
    assert not any(name.startswith("crashed.h5") or name.endswith(".csv") and "crashed" in name for name in leftovers(tmp_path))
    monkeypatch.setattr(finetune_module, "save_checkpoint", real_save)
    messages = []
    resumed = run_extract(config(cifar_subset, tmp_path, run="crashed", epochs=2, resume=True), log=messages.append)
    assert any("resumed" in m and "after epoch 1/2" in m for m in messages)
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    a, b = read_features(straight.path), read_features(resumed.path)
    for name in a.splits:
        np.testing.assert_array_equal(a.splits[name].features, b.splits[name].features)
    # a checkpoint from other options is refused, not silently mixed in
    result = invoke(base_args(cifar_subset, tmp_path, "--name", "crashed", "--epochs", "2", "--lr", "0.5", "--resume"))
    assert result.exit_code == 2 and "checkpoint was made with lr=0.05, this run has 0.5" in result.output


def test_shards_cover_every_row_once_in_order():
    n, world, batch = 23, 3, 4
    per_rank = [shard_batches(n, world_size=world, rank=r, batch_size=batch) for r in range(world)]
    merged = [i for chunk in zip(*per_rank) for batch_rows in chunk for i in batch_rows]
    assert merged == list(range(n))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(cifar_subset, tmp_path):
    """torchrun --nproc_per_node=2 on the CPU (gloo): same splits, labels and shapes as one process,
    and the sharded, merged embeddings equal a single-process pass of the final model."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [
        str(VENV_BIN / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(VENV_BIN / "decouple"),
        *base_args(cifar_subset, tmp_path / "ddp", "--epochs", "1", "--name", "ddp"),
    ]
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.count("wrote ") == 1  # rank 0 alone reports and writes
    assert leftovers(tmp_path / "ddp") == ["ddp.ckpt.pt", "ddp.h5", "ddp.manifest.csv"]
    single = run_extract(config(cifar_subset, tmp_path / "one", run="one"), log=lambda m: None)
    ddp, one = read_features(tmp_path / "ddp" / "ddp.h5"), read_features(single.path)
    assert ddp.class_names == one.class_names and list(ddp.splits) == list(one.splits)
    for name in one.splits:
        np.testing.assert_array_equal(ddp.splits[name].labels, one.splits[name].labels)
        np.testing.assert_array_equal(ddp.splits[name].fingerprints, one.splits[name].fingerprints)  # gathered in order
        assert ddp.splits[name].features.shape == one.splits[name].features.shape
    assert json.loads(ddp.attrs["config"])["world_size"] == 2
    # rank order survives the merge: re-embed test with the trained weights in one process
    from decouple.stage_one.backbones import create_backbone, embed
    from decouple.stage_one.images import ImageDataset
    from decouple.stage_one.finetune import data_config_for, make_transform

    model, _ = create_backbone("test_resnet", num_classes=10)
    model.load_state_dict(torch.load(tmp_path / "ddp" / "ddp.ckpt.pt", weights_only=True)["model"])
    model.eval()
    items = read_manifest(tmp_path / "ddp" / "ddp.manifest.csv").splits["test"]
    dataset = ImageDataset(items, make_transform(data_config_for(model, 32), is_training=False))
    with torch.no_grad():
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        expected = embed(model, images).numpy()
    np.testing.assert_allclose(ddp.splits["test"].features, expected, rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------- bad input


def tiny_folder(root: Path, classes, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{j}.png")
    return root


def assert_bad_input(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    # progress lines may come first; the error is one last line, no traceback
    assert lines[-1].startswith("Error: ") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def small_args(data: Path, out: Path, *extra: str) -> list:
    return ["extract", "--data", str(data), "--backbone", "test_resnet", "--epochs", "0",
            "--features-dir", str(out), "--no-progress", *extra]


def test_empty_class_folder(tmp_path):
    data = tiny_folder(tmp_path / "d", ["ant", "bee"])
    (data / "wasp").mkdir()
    assert_bad_input(invoke(small_args(data, tmp_path / "f")), "wasp: class folder 'wasp' holds no images")
    assert leftovers(tmp_path / "f") == []


def test_single_class(tmp_path):
    data = tiny_folder(tmp_path / "d", ["ant"])
    assert_bad_input(invoke(small_args(data, tmp_path / "f")), "single class 'ant'")


def test_fewer_images_than_the_profile_asks(tmp_path):
    data = tiny_folder(tmp_path / "d", ["ant", "bee", "cow"])
    result = invoke(small_args(data, tmp_path / "f", "--imbalance", "2", "--n-max", "50"))
    assert_bad_input(result, "class 'ant' has 5 images", "asks 50 plus 20 for val")
    assert leftovers(tmp_path / "f") == []


def test_unknown_backbone_suggests(tmp_path):
    data = tiny_folder(tmp_path / "d", ["ant", "bee"])
    result = invoke(small_args(data, tmp_path / "f", "--backbone", "convnext_bse"))  # the last one counts
    assert_bad_input(result, "unknown timm model 'convnext_bse'", "'convnext_base'")


def test_a_sampler_that_synthesises_features_is_refused(tmp_path):
    data = tiny_folder(tmp_path / "d", ["ant", "bee"])
    result = invoke(small_args(data, tmp_path / "f", "--sampler", "calibrated_features"))
    assert_bad_input(result, "--sampler calibrated_features is a stage-two sampler",
                     "instance, class_balanced, square_root, progressive")
    assert leftovers(tmp_path / "f") == []


def test_pretrained_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    data = tiny_folder(tmp_path / "d", ["ant", "bee"])
    assert_bad_input(invoke(small_args(data, tmp_path / "f", "--pretrained")), "cannot be had offline", "--weights FILE")
    assert leftovers(tmp_path / "f") == []


def test_corrupt_images_skipped_and_listed_or_fatal(tmp_path):
    data = tiny_folder(tmp_path / "d", ["ant", "bee"])
    (data / "bee" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    result = invoke(small_args(data, tmp_path / "f", "--img-size", "16"))
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable image(s):" in result.stderr and "broken.jpg" in result.stderr
    assert_bad_input(invoke(small_args(data, tmp_path / "g", "--strict")), "broken.jpg: cannot be decoded", "--strict")
    assert leftovers(tmp_path / "g") == []


def test_full_disk_leaves_nothing(tmp_path, monkeypatch):
    from decouple.features import FeatureWriter

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FeatureWriter, "write_rows", no_space)
    data = tiny_folder(tmp_path / "d", ["ant", "bee"])
    assert_bad_input(invoke(small_args(data, tmp_path / "f")), "no space left on device", "temporary file was removed")
    assert leftovers(tmp_path / "f") == []


@pytest.mark.parametrize("failure", ["embedding", "feature_commit"])
def test_a_failed_rerun_leaves_the_previous_run_intact(tmp_path, monkeypatch, failure):
    # The new manifest is committed right after the new feature file, and
    # neither before both are complete.
    import decouple.stage_one.extract
    import decouple.features

    data = tiny_folder(tmp_path / "d", ["ant", "bee", "cow"])
    out = tmp_path / "f"
    assert invoke(small_args(data, out, "--name", "run", "--img-size", "16")).exit_code == 0
    before = {name: (out / name).read_bytes() for name in leftovers(out)}
    assert set(before) == {"run.h5", "run.manifest.csv"}
    (data / "cow" / "extra.png").write_bytes((data / "cow" / "0.png").read_bytes())  # a changed rerun

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, f"injected failure in {failure}")

    if failure == "embedding":
        monkeypatch.setattr(decouple.stage_one.extract, "embed_split", fail)
    else:
        monkeypatch.setattr(decouple.features, "commit", fail)
    result = invoke(small_args(data, out, "--name", "run", "--img-size", "16"))
    assert result.exit_code != 0
    after = {name: (out / name).read_bytes() for name in leftovers(out)}
    assert after == before  # byte for byte, and no temporary file left


@pytest.mark.parametrize("size", [32, 96])
def test_uint8_images_normalised_per_batch_are_the_per_image_floats(cifar_subset, size):
    """Issue 13: extraction decodes and crops each image to uint8 and
    normalises whole batches; the floats are exactly ToTensor + Normalize's,
    on the CIFAR recipe (32 px) and on timm's resize-and-crop (96 px)."""
    from PIL import Image

    from decouple.stage_one.finetune import make_transform, make_uint8_transform

    config = {"input_size": (3, size, size), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
              "interpolation": "bicubic", "crop_pct": 0.875 if size > 64 else 1.0, "crop_mode": "center"}
    images = [Image.open(path).convert("RGB") for path in sorted(cifar_subset.glob("train/*/000[0-2].jpg"))]
    per_image = torch.stack([make_transform(config, is_training=False)(image) for image in images])
    to_uint8, normalize = make_uint8_transform(config)
    batch = torch.stack([to_uint8(image) for image in images])
    assert batch.dtype == torch.uint8 and batch.shape == per_image.shape
    assert torch.equal(normalize(batch), per_image)
