"""Decoded training images, kept once, and their augmentation on whole batches.

``decouple extract --cache-images memory|disk|device`` decodes and resizes
every training image once, to uint8 (N, 3, S, S), in RAM, in a file beside
the run's checkpoint (memory-mapped, reused by a rerun: :func:`disk_cache`)
or in the training device's memory (:class:`DecodedImages`), instead of
decoding each image again every epoch. The training augmentation then runs on whole batches
with torch ops on the device (:class:`PadCropFlip`): the CIFAR recipe of He
et al. (2016) that :func:`~decouple.stage_one.finetune.make_transform` uses
at 64 pixels or less, zero padding of S // 8, a random S x S crop, a
horizontal flip with probability 1/2, then the normalisation. For given
offsets and flips it computes exactly what torchvision's per-image
RandomCrop, RandomHorizontalFlip, ToTensor and Normalize compute; the
random draws differ (a torch generator per epoch instead of per-image
ones), so a run with the cache is another draw of the same recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms as T
from tqdm.auto import tqdm

from decouple.atomic import atomic_path
from decouple.errors import ConfigError
from decouple.stage_one.images import ImageDataset
from decouple.stage_one.manifest import SplitItems

#: ``--cache-images`` choices: none, RAM, a memory-mapped file, the training device's memory.
CACHE_MODES = ("off", "memory", "disk", "device")
#: Bumped when what a disk cache holds changes, so that old files are not read.
DISK_FORMAT = 1
#: The largest input side the cache serves: the pad-and-crop recipe's.
MAX_CACHED_SIDE = 64


def check_cache_mode(mode: str, input_side: int) -> str:
    """``mode`` if it is a cache mode the input size allows, else a ConfigError."""
    if mode not in CACHE_MODES:
        raise ConfigError(f"--cache-images must be one of {', '.join(CACHE_MODES)}; got {mode!r}")
    if mode != "off" and input_side > MAX_CACHED_SIDE:
        raise ConfigError(
            f"--cache-images {mode} serves the pad-and-crop recipe of inputs of {MAX_CACHED_SIDE} px or less so "
            f"far; this run trains at {input_side} px (use --cache-images off)"
        )
    return mode


def decode_all(items: SplitItems, side: int, *, workers: int = 0, progress: bool = False) -> torch.Tensor:
    """Every image of ``items`` decoded and resized to uint8 (N, 3, side, side), in order."""
    dataset = ImageDataset(items, T.Compose([T.Resize((side, side)), T.PILToTensor()]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=workers)
    images = torch.empty((len(dataset), 3, side, side), dtype=torch.uint8)
    start = 0
    for batch, _ in tqdm(loader, desc="decoding images", unit="batch", disable=not progress, leave=False):
        images[start : start + len(batch)] = batch
        start += len(batch)
    return images


def cache_key(items: SplitItems, side: int) -> str:
    """sha256 of what a disk cache holds: the images (references, in order,
    with each file's size and modification time where the reference is a
    file), their labels, the side and the resizing; a change to any makes a
    new file."""
    digest = hashlib.sha256(json.dumps({"format": DISK_FORMAT, "side": int(side),
                                        "resize": "torchvision Resize((side, side)), antialias, to uint8"}).encode())
    for ref in items.refs:
        try:
            stat = os.stat(ref)
            stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        except (OSError, ValueError):  # not a file of its own (an image inside a CIFAR batch file, say)
            stamp = ""
        digest.update(f"{ref}\0{stamp}\0".encode("utf-8"))
    digest.update(np.ascontiguousarray(items.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def disk_cache(items: SplitItems, side: int, base: Path, *, workers: int = 0, progress: bool = False,
               log: Callable[[str], None] = print) -> Tuple[torch.Tensor, Path]:
    """The decoded images of ``items`` as a memory-mapped uint8 (N, 3, side,
    side) tensor, from ``<base>.images-<key>.u8`` (:func:`cache_key`): reused
    when it is there and whole, else decoded and written atomically (a
    crash leaves no partial file)."""
    path = base.parent / f"{base.name}.images-{cache_key(items, side)[:16]}.u8"
    shape = (len(items.refs), 3, int(side), int(side))
    if path.is_file() and path.stat().st_size == int(np.prod(shape)):
        log(f"reusing the decoded images in {path}")
    else:
        images = decode_all(items, side, workers=workers, progress=progress)
        with atomic_path(path) as tmp:
            images.numpy().tofile(tmp)
        log(f"decoded {shape[0]} images into {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=shape)), path


class DecodedImages:
    """Every image of ``items`` decoded once, resized to ``side`` x ``side``:
    ``images`` uint8 (N, 3, side, side) and ``labels`` int64 (N,), on
    ``device`` ("cpu" for RAM). Decoding runs through a DataLoader with
    ``workers`` processes, with a progress bar when ``progress``."""

    def __init__(self, items: SplitItems, side: int, *, device: Any = "cpu", workers: int = 0,
                 progress: bool = False, images: Optional[torch.Tensor] = None) -> None:
        if images is None:
            images = decode_all(items, side, workers=workers, progress=progress)
        self.images = images.to(device)
        self.labels = torch.as_tensor(items.labels, dtype=torch.int64, device=device)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, indices: Sequence[int], batch_size: int, *, drop_last: bool) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) of ``indices`` in batches of ``batch_size``,
        as a DataLoader over them would give them."""
        order = torch.as_tensor(list(indices), dtype=torch.int64)
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for start in range(0, stop, batch_size):
            chosen = order[start : start + batch_size].to(self.images.device)
            yield self.images.index_select(0, chosen), self.labels.index_select(0, chosen)


class BatchNormalize:
    """uint8 images (B, 3, H, W) -> float32 (x / 255 - mean) / std, the
    arithmetic of torchvision's ToTensor then Normalize, for a whole batch."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor([float(value) for value in mean]).view(1, -1, 1, 1)
        self.std = torch.tensor([float(value) for value in std]).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return images.to(torch.float32).div_(255).sub_(mean).div_(std)


class PadCropFlip:
    """He et al.'s augmentation on uint8 batches (B, 3, S, S): zero padding of
    S // 8, a random S x S crop and a random horizontal flip, then
    normalisation to float32 (:class:`BatchNormalize`), on the batch's device."""

    def __init__(self, side: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.side = int(side)
        self.padding = self.side // 8
        self.normalize = BatchNormalize(mean, std)

    def draw(self, batch: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """Offsets (top, left) uniform on 0 .. 2 * padding and flips with probability 1/2, each (batch,)."""
        span = 2 * self.padding + 1
        return {
            "top": torch.randint(0, span, (batch,), generator=generator, device=generator.device),
            "left": torch.randint(0, span, (batch,), generator=generator, device=generator.device),
            "flip": torch.rand(batch, generator=generator, device=generator.device) < 0.5,
        }

    def apply(self, images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """The augmented, normalised batch for the given offsets and flips."""
        batch, channels, side, _ = images.shape
        pad = self.padding
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        steps = torch.arange(side, device=images.device)
        rows = (top.to(images.device)[:, None] + steps)[:, None, :, None].expand(batch, channels, side, side + 2 * pad)
        cropped = padded.gather(2, rows)
        cols = (left.to(images.device)[:, None] + steps)[:, None, None, :].expand(batch, channels, side, side)
        cropped = cropped.gather(3, cols)
        cropped = torch.where(flip.to(images.device)[:, None, None, None], cropped.flip(3), cropped)
        return self.normalize(cropped)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, **self.draw(len(images), generator))


def epoch_generator(device: torch.device, seed: int, epoch: int, rank: int) -> torch.Generator:
    """The augmentation's generator of one epoch, on ``device``: a function of (seed, epoch, rank)."""
    generator = torch.Generator(device=device)
    generator.manual_seed((int(seed) * 1_000_003 + int(epoch)) * 1_009 + int(rank))
    return generator


def cache_for(mode: str, items: SplitItems, side: int, *, device: torch.device, workers: int, progress: bool,
              disk_base: Optional[Path] = None, log: Callable[[str], None] = print) -> Optional[DecodedImages]:
    """The decoded training images of ``mode`` (None for "off"); "disk" keeps
    them in a file named from ``disk_base`` (:func:`disk_cache`)."""
    if mode == "off":
        return None
    if mode == "disk":
        if disk_base is None:
            raise ConfigError("--cache-images disk needs a place for its file: give the run a checkpoint path")
        images, _ = disk_cache(items, side, disk_base, workers=workers, progress=progress, log=log)
        return DecodedImages(items, side, images=images)
    return DecodedImages(items, side, device=device if mode == "device" else "cpu", workers=workers,
                         progress=progress)
