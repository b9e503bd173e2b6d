"""The decoded-image cache of stage one and its batch augmentation (issue 13):
exactly torchvision's per-image pad-crop-flip for given draws, draws of the
right distribution, a function of (seed, epoch, rank), and a fine-tune run
that uses them end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from decouple.errors import ConfigError
from decouple.features import read_features
from decouple.stage_one.image_cache import (
    DecodedImages,
    PadCropFlip,
    check_cache_mode,
    decode_all,
    disk_cache,
    epoch_generator,
)
from decouple.stage_one.manifest import SplitItems

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _images(cifar_subset, count=12):
    return [Image.open(path).convert("RGB") for path in sorted(cifar_subset.glob("train/*/000[0-1].jpg"))[:count]]


def test_pad_crop_flip_is_torchvisions_per_image_recipe_for_the_same_draws(cifar_subset):
    """Zero padding of S // 8, the S x S crop at (top, left), the flip, then
    ToTensor and Normalize: the same floats, bit for bit."""
    side = 32
    images = _images(cifar_subset)
    augment = PadCropFlip(side, MEAN, STD)
    top, left = torch.tensor([0, 8, 3, 5, 8, 0, 1, 7, 4, 2, 6, 8]), torch.tensor([8, 0, 3, 6, 8, 0, 2, 5, 1, 7, 4, 4])
    flip = torch.tensor([False, True, True, False, True, False, True, True, False, False, True, False])
    batch = torch.stack([TF.pil_to_tensor(image.resize((side, side))) for image in images])
    got = augment.apply(batch, top, left, flip)
    expected = []
    for image, y, x, f in zip(images, top.tolist(), left.tolist(), flip.tolist()):
        padded = TF.pad(image.resize((side, side)), 4, fill=0)
        cropped = TF.crop(padded, y, x, side, side)
        expected.append(TF.normalize(TF.to_tensor(TF.hflip(cropped) if f else cropped), MEAN, STD))
    assert torch.equal(got, torch.stack(expected))


def test_draws_are_uniform_offsets_and_fair_flips_and_a_function_of_seed_epoch_rank():
    augment = PadCropFlip(32, MEAN, STD)
    draws = augment.draw(36_000, epoch_generator(torch.device("cpu"), 0, 3, 0))
    for key in ("top", "left"):
        counts = np.bincount(draws[key].numpy(), minlength=9)
        assert len(counts) == 9 and draws[key].min() == 0 and draws[key].max() == 8
        expected, sd = 36_000 / 9, np.sqrt(36_000 * (1 / 9) * (8 / 9))
        assert np.all(np.abs(counts - expected) < 5 * sd), counts
    assert abs(draws["flip"].float().mean().item() - 0.5) < 5 * np.sqrt(0.25 / 36_000)
    again = augment.draw(36_000, epoch_generator(torch.device("cpu"), 0, 3, 0))
    other = augment.draw(36_000, epoch_generator(torch.device("cpu"), 0, 4, 0))
    assert all(torch.equal(draws[key], again[key]) for key in draws)
    assert not torch.equal(draws["top"], other["top"])


def test_decoded_images_are_the_resized_uint8_images_in_order(cifar_subset):
    paths = sorted(cifar_subset.glob("train/*/0000.jpg"))
    items = SplitItems(refs=[str(path) for path in paths], labels=np.arange(len(paths)))
    cache = DecodedImages(items, 16)
    assert cache.images.dtype == torch.uint8 and cache.images.shape == (len(paths), 3, 16, 16)
    expected = torch.stack([T.PILToTensor()(T.Resize((16, 16))(Image.open(path).convert("RGB"))) for path in paths])
    assert torch.equal(cache.images, expected)
    batches = list(cache.batches([3, 1, 4, 0, 2], 2, drop_last=True))
    assert [labels.tolist() for _, labels in batches] == [[3, 1], [4, 0]]
    assert [labels.tolist() for _, labels in cache.batches([3, 1, 4], 2, drop_last=False)] == [[3, 1], [4]]


def test_cache_modes_and_sizes_are_checked():
    assert check_cache_mode("memory", 32) == "memory"
    with pytest.raises(ConfigError, match="64 px or less"):
        check_cache_mode("memory", 224)
    with pytest.raises(ConfigError, match="off, memory, disk, device"):
        check_cache_mode("ram", 32)


def _extract(data, out, *extra):
    result = CliRunner().invoke(cli, [
        "extract", "--data", str(data), "--backbone", "test_resnet", "--epochs", "2", "--batch-size", "16",
        "--val-per-class", "2", "--features-dir", str(out), "--name", "run", "--no-progress", "--json", *extra])
    return result


def test_a_fine_tune_with_the_memory_cache_runs_and_repeats_itself(cifar_subset, tmp_path):
    first = _extract(cifar_subset, tmp_path / "a", "--cache-images", "memory")
    assert first.exit_code == 0, first.output
    second = _extract(cifar_subset, tmp_path / "b", "--cache-images", "memory")
    assert second.exit_code == 0, second.output
    one, two = (read_features(tmp_path / name / "run.h5") for name in ("a", "b"))
    for split in one.splits:
        np.testing.assert_array_equal(one.splits[split].features, two.splits[split].features)
    history = json.loads(first.stdout.splitlines()[-1])["history"]
    assert len(history) == 2 and all(np.isfinite(epoch["loss"]) for epoch in history)
    refused = _extract(cifar_subset, tmp_path / "c", "--cache-images", "memory", "--img-size", "96")
    assert refused.exit_code != 0 and "64 px or less" in refused.output


def test_the_disk_cache_is_written_once_reused_and_keyed_by_images_and_size(cifar_subset, tmp_path):
    paths = sorted(cifar_subset.glob("train/*/000[0-2].jpg"))
    items = SplitItems(refs=[str(path) for path in paths], labels=np.repeat(np.arange(10), 3))
    said = []
    images, path = disk_cache(items, 16, tmp_path / "run", log=said.append)
    assert torch.equal(images, decode_all(items, 16)) and said[-1].startswith("decoded 30 images")
    written = path.stat().st_mtime_ns
    again, same = disk_cache(items, 16, tmp_path / "run", log=said.append)
    assert same == path and path.stat().st_mtime_ns == written and said[-1].startswith("reusing")
    assert torch.equal(again, images)
    other, other_path = disk_cache(items, 20, tmp_path / "run", log=said.append)
    assert other_path != path and other.shape == (30, 3, 20, 20)
    fewer = SplitItems(refs=items.refs[:-1], labels=items.labels[:-1])
    assert disk_cache(fewer, 16, tmp_path / "run", log=said.append)[1] != path
    stamp = paths[0].stat()
    os.utime(paths[0], ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000_000))  # the image changed
    assert disk_cache(items, 16, tmp_path / "run", log=said.append)[1] != path


def test_disk_and_memory_caches_train_the_same_network(cifar_subset, tmp_path):
    """The same decoded images and the same draws: identical features."""
    memory = _extract(cifar_subset, tmp_path / "m", "--cache-images", "memory")
    disk = _extract(cifar_subset, tmp_path / "d", "--cache-images", "disk")
    assert memory.exit_code == 0 and disk.exit_code == 0, disk.output
    assert list((tmp_path / "d").glob("run.images-*.u8"))
    one, two = (read_features(tmp_path / name / "run.h5") for name in ("m", "d"))
    for split in one.splits:
        np.testing.assert_array_equal(one.splits[split].features, two.splits[split].features)
