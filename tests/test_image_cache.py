"""The decoded-image cache of stage one and its batch augmentation (issue 13):
exactly torchvision's per-image pad-crop-flip for given draws; for larger
inputs timm's random-resized crop (its draws, including the centre-crop
fallback, torchvision's resize of the box and ColorJitter's arithmetic);
draws of the right distribution, a function of (seed, epoch, rank); and
fine-tune runs that use them end to end."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from click.testing import CliRunner
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

from cli.main import cli
from decouple.errors import ConfigError
from decouple.features import read_features
from decouple.stage_one.image_cache import (
    JITTERS,
    DecodedImages,
    PadCropFlip,
    RandomResizedCropFlip,
    augmentation_for,
    cache_side,
    check_cache_mode,
    decode_all,
    disk_cache,
    epoch_generator,
    resolve_cache_mode,
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
    assert cache.sizes.tolist() == [[32, 32]] * len(paths)  # the CIFAR JPEGs' own size
    batches = list(cache.batches([3, 1, 4, 0, 2], 2, drop_last=True))
    assert [labels.tolist() for _, _, labels in batches] == [[3, 1], [4, 0]]
    assert [labels.tolist() for _, _, labels in cache.batches([3, 1, 4], 2, drop_last=False)] == [[3, 1], [4]]


def test_cache_modes_are_checked_and_auto_keeps_ram_for_what_fits_in_a_quarter_at_64_px_or_less():
    assert check_cache_mode("memory") == "memory"
    with pytest.raises(ConfigError, match="off, auto, memory, disk, device"):
        check_cache_mode("ram")
    image = 3 * 32 * 32
    assert resolve_cache_mode("auto", 1000, 32, memory=4 * 1000 * image) == "memory"
    assert resolve_cache_mode("auto", 1001, 32, memory=4 * 1000 * image) == "disk"
    assert resolve_cache_mode("auto", 1000, 32, memory=4 * 1000 * image, processes_per_node=2) == "disk"
    assert resolve_cache_mode("off", 10**9, 224, memory=1) == "off"
    assert resolve_cache_mode("auto", 10, 256, input_side=224, memory=10**12) == "off"  # not yet measured above 64 px
    assert resolve_cache_mode("memory", 10, 256, input_side=224) == "memory"
    assert resolve_cache_mode("device", 10, 32) == "device"


def test_cache_side_and_augmentation_follow_the_per_image_recipe_of_the_input_size():
    small = {"input_size": (3, 32, 32), "mean": MEAN, "std": STD}
    large = {"input_size": (3, 224, 224), "mean": MEAN, "std": STD, "crop_pct": 0.875, "interpolation": "bicubic"}
    assert cache_side(small) == 32 and isinstance(augmentation_for(small), PadCropFlip)
    assert cache_side(large) == 256
    augment = augmentation_for(large)
    assert isinstance(augment, RandomResizedCropFlip) and augment.side == 224 and augment.mode == "bicubic"


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


def test_a_fine_tune_above_64_px_trains_with_the_random_resized_crop_cache(cifar_subset, tmp_path):
    result = _extract(cifar_subset, tmp_path / "rrc", "--cache-images", "memory", "--img-size", "72")
    assert result.exit_code == 0, result.output
    history = json.loads(result.stdout.splitlines()[-1])["history"]
    assert len(history) == 2 and all(np.isfinite(epoch["loss"]) for epoch in history)


def test_the_disk_cache_is_written_once_reused_and_keyed_by_images_and_size(cifar_subset, tmp_path):
    paths = sorted(cifar_subset.glob("train/*/000[0-2].jpg"))
    items = SplitItems(refs=[str(path) for path in paths], labels=np.repeat(np.arange(10), 3))
    said = []
    images, sizes, path = disk_cache(items, 16, tmp_path, log=said.append)
    decoded, decoded_sizes = decode_all(items, 16)
    assert torch.equal(images, decoded) and torch.equal(sizes, decoded_sizes)
    assert said[-1].startswith("decoded 30 images")
    written = path.stat().st_mtime_ns
    again, again_sizes, same = disk_cache(items, 16, tmp_path, log=said.append)
    assert same == path and path.stat().st_mtime_ns == written and said[-1].startswith("reusing")
    assert torch.equal(again, images) and torch.equal(again_sizes, sizes)
    other, _, other_path = disk_cache(items, 20, tmp_path, log=said.append)
    assert other_path != path and other.shape == (30, 3, 20, 20)
    fewer = SplitItems(refs=items.refs[:-1], labels=items.labels[:-1])
    assert disk_cache(fewer, 16, tmp_path, log=said.append)[2] != path
    stamp = paths[0].stat()
    os.utime(paths[0], ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000_000))  # the image changed
    assert disk_cache(items, 16, tmp_path, log=said.append)[2] != path


def test_disk_and_memory_caches_train_the_same_network(cifar_subset, tmp_path):
    """The same decoded images and the same draws: identical features."""
    memory = _extract(cifar_subset, tmp_path / "m", "--cache-images", "memory")
    disk = _extract(cifar_subset, tmp_path / "d", "--cache-images", "disk")
    assert memory.exit_code == 0 and disk.exit_code == 0, disk.output
    assert list((tmp_path / "d").glob("decoded-images-*.u8"))
    one, two = (read_features(tmp_path / name / "run.h5") for name in ("m", "d"))
    for split in one.splits:
        np.testing.assert_array_equal(one.splits[split].features, two.splits[split].features)


# --------------------------------------------------------------------------- random-resized crop (above 64 px)


def _box(**values):
    return {key: torch.tensor([float(value)]) for key, value in values.items()}


def test_the_crop_of_the_whole_image_is_torchvisions_resize():
    """Box = the whole image, cached at its own size: the output is
    torchvision's bilinear resize of it (no antialiasing needed when
    enlarging), and a flip mirrors it."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8, generator=generator)
    augment = RandomResizedCropFlip(72, MEAN, STD)
    sizes = torch.tensor([[40, 40]])
    got = augment.crop(image, sizes, flip=torch.tensor([False]), **_box(top=0, left=0, height=40, width=40))
    expected = TF.resize(image.float(), [72, 72], interpolation=T.InterpolationMode.BILINEAR, antialias=False) / 255
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    flipped = augment.crop(image, sizes, flip=torch.tensor([True]), **_box(top=0, left=0, height=40, width=40))
    torch.testing.assert_close(flipped, got.flip(3), atol=1e-4, rtol=0)


def test_a_box_is_read_in_the_images_own_pixels_from_the_squashed_cache():
    """An 80 x 40 image cached at 40 x 40: the box of its left 40 x 40
    pixels is the left half of the cached image, stretched back, the same
    as torchvision's resized crop of that half away from its border."""
    generator = torch.Generator().manual_seed(1)
    cached = torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8, generator=generator)
    augment = RandomResizedCropFlip(80, MEAN, STD)
    got = augment.crop(cached, torch.tensor([[80, 40]]), flip=torch.tensor([False]),
                       **_box(top=0, left=0, height=40, width=40))
    expected = TF.resize(cached[..., :20].float(), [80, 80], interpolation=T.InterpolationMode.BILINEAR,
                         antialias=False) / 255
    torch.testing.assert_close(got[..., 2:-2, 2:-2], expected[..., 2:-2, 2:-2], atol=1e-4, rtol=0)


def test_colour_jitter_is_torchvisions_adjustments_in_the_drawn_order():
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(6, 3, 8, 8, generator=generator)
    factors = 0.6 + 0.8 * torch.rand(6, 3, generator=generator)
    order = torch.stack([torch.randperm(3, generator=generator) for _ in range(6)])
    got = RandomResizedCropFlip(8, MEAN, STD).color(images.clone(), factors, order)
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for row in range(6):
        image = images[row]
        for which in order[row].tolist():
            image = adjust[which](image, float(factors[row, which]))
        torch.testing.assert_close(got[row], image, atol=1e-6, rtol=0)
    assert JITTERS == ("brightness", "contrast", "saturation")


def test_boxes_are_drawn_as_timm_draws_them():
    """Inside the image, the area fraction on 0.08..1 and the aspect ratio
    on 3/4..4/3 (up to rounding), with the mean area fraction of timm's own
    get_params on the same image; an image no box fits gets timm's centre crop."""
    count, (width, height) = 20_000, (500, 375)
    augment = RandomResizedCropFlip(224, MEAN, STD)
    sizes = torch.tensor([[width, height]] * count)
    draws = augment.draw(sizes, epoch_generator(torch.device("cpu"), 0, 1, 0))
    top, left, box_h, box_w = (draws[key] for key in ("top", "left", "height", "width"))
    assert bool((top >= 0).all() and (left >= 0).all() and (top + box_h <= height).all() and (left + box_w <= width).all())
    fraction = (box_h * box_w / (width * height)).numpy()
    assert fraction.min() >= 0.075 and fraction.max() <= 1.0
    aspect = (box_w / box_h).numpy()
    assert aspect.min() > 0.7 and aspect.max() < 1.4
    random.seed(0)
    image = Image.new("RGB", (width, height))
    theirs = np.array([h * w / (width * height) for _, _, h, w in
                       (RandomResizedCropAndInterpolation.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
                        for _ in range(count))])
    standard_error = math.sqrt(fraction.var() / count + theirs.var() / count)
    assert abs(fraction.mean() - theirs.mean()) < 5 * standard_error
    assert abs(draws["flip"].float().mean().item() - 0.5) < 5 * math.sqrt(0.25 / count)
    factors = draws["factors"].numpy()
    assert factors.min() >= 0.6 and factors.max() <= 1.4 and abs(factors.mean() - 1.0) < 0.01
    assert sorted(draws["order"][0].tolist()) == [0, 1, 2]
    wide = augment.draw(torch.tensor([[1000, 10]]), torch.Generator().manual_seed(0))
    i, j, h, w = RandomResizedCropAndInterpolation.get_params(Image.new("RGB", (1000, 10)), (0.08, 1.0), (3 / 4, 4 / 3))
    assert [wide[key].item() for key in ("top", "left", "height", "width")] == [i, j, h, w]
