"""Decoded training images, kept once, and their augmentation on whole batches.

``decouple extract --cache-images auto|memory|disk|device`` decodes and
resizes every training image once, to uint8 (N, 3, S, S) with its size
before resizing, in RAM, in a file beside the run's checkpoint
(memory-mapped, reused by a rerun: :func:`disk_cache`) or in the training
device's memory (:class:`DecodedImages`), instead of decoding each image
again every epoch. It is off by default: on CIFAR-10-LT (IF = 100, 40
epochs, one stage-one run each) the cached run's linear / ce head scored
65.4% balanced top-1 against 66.6% for the per-image pipeline, 0.2 point
outside the 1-point target, within the stage-two seeds' spread (1.3)
but with the stage-one seed's unmeasured (docs/benchmarks.md). ``auto``
(:func:`resolve_cache_mode`) keeps the images in RAM when they fit in a
quarter of it, else on disk, for inputs of 64 px or less; above, it stays
off until a full run checks the cached random-resized crop, which reads
small boxes from the cached copy rather than the original. The
training augmentation of :func:`~decouple.stage_one.finetune.make_transform`
then runs on whole batches with torch ops on the device:

* 64 px or less, :class:`PadCropFlip`: the CIFAR recipe of He et al.
  (2016), zero padding of S // 8, a random S x S crop, a horizontal flip
  with probability 1/2, then the normalisation. For given offsets and flips
  it computes exactly what torchvision's per-image RandomCrop,
  RandomHorizontalFlip, ToTensor and Normalize compute.
* above, :class:`RandomResizedCropFlip`: timm's ImageNet recipe
  (Szegedy et al. 2015's random-resized crop, scale 0.08..1, ratio 3/4..4/3,
  timm's ten attempts and centre-crop fallback; a flip; ColorJitter 0.4 of
  brightness, contrast and saturation in a random order), from images
  cached at S / crop_pct (256 px for 224) whose crop boxes are drawn in
  each image's own pixel geometry.

The random draws differ from the per-image pipeline's (a torch generator
per epoch instead of Python's), so a run with the cache is another draw of
the same recipe.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms as T
from tqdm.auto import tqdm

from decouple.atomic import atomic_path
from decouple.errors import ConfigError
from decouple.stage_one.images import ImageDataset
from decouple.stage_one.manifest import SplitItems

#: ``--cache-images`` choices: none, RAM or disk by size, RAM, a memory-mapped file, the training device's memory.
CACHE_MODES = ("off", "auto", "memory", "disk", "device")
#: Bumped when what a disk cache holds changes, so that old files are not read.
DISK_FORMAT = 2
#: The largest input side trained with pad-and-crop (:class:`PadCropFlip`); above it, :class:`RandomResizedCropFlip`.
PAD_CROP_MAX_SIDE = 64
#: The share of the machine's memory (split between a node's processes) that ``auto`` lets the cache take.
AUTO_MEMORY_SHARE = 0.25


def check_cache_mode(mode: str) -> str:
    """``mode`` if it is a cache mode, else a ConfigError that lists them."""
    if mode not in CACHE_MODES:
        raise ConfigError(f"--cache-images must be one of {', '.join(CACHE_MODES)}; got {mode!r}")
    return mode


def cache_side(data_config: Mapping[str, Any]) -> int:
    """The side the images are cached at: the input side for pad-and-crop;
    the input side over timm's crop_pct (0.875 when unset) for the
    random-resized crop, whose boxes are then read from an image a little
    larger than the output, as the per-image pipeline reads the original."""
    side = int(data_config["input_size"][-1])
    if side <= PAD_CROP_MAX_SIDE:
        return side
    return int(math.ceil(side / float(data_config.get("crop_pct") or 0.875)))


def machine_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return int(total)
    return int(min(total, int(limit))) if limit.isdigit() else int(total)


def resolve_cache_mode(mode: str, n_images: int, side: int, *, input_side: Optional[int] = None,
                       processes_per_node: int = 1, memory: Optional[int] = None) -> str:
    """``auto`` made concrete: "off" for an ``input_side`` over
    :data:`PAD_CROP_MAX_SIDE`; else "memory" when ``n_images`` decoded at
    ``side`` fit in :data:`AUTO_MEMORY_SHARE` of the machine's memory
    (shared by the node's ``processes_per_node`` copies), else "disk";
    other modes as given."""
    if check_cache_mode(mode) != "auto":
        return mode
    if (side if input_side is None else input_side) > PAD_CROP_MAX_SIDE:
        return "off"
    budget = AUTO_MEMORY_SHARE * (machine_memory() if memory is None else memory) / max(1, processes_per_node)
    return "memory" if n_images * 3 * side * side <= budget else "disk"


class _DecodeResize:
    """PIL image -> (uint8 (3, side, side), its (width, height) before resizing)."""

    def __init__(self, side: int) -> None:
        self.resize = T.Compose([T.Resize((side, side)), T.PILToTensor()])

    def __call__(self, image: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.resize(image), torch.tensor(image.size, dtype=torch.int32)


def decode_all(items: SplitItems, side: int, *, workers: int = 0,
               progress: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``items`` decoded and resized, in order: uint8 (N, 3,
    side, side) and each image's (width, height) before resizing, int32 (N, 2)."""
    dataset = ImageDataset(items, _DecodeResize(side))
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=workers)
    images = torch.empty((len(dataset), 3, side, side), dtype=torch.uint8)
    sizes = torch.empty((len(dataset), 2), dtype=torch.int32)
    start = 0
    for (batch, batch_sizes), _ in tqdm(loader, desc="decoding images", unit="batch", disable=not progress,
                                        leave=False):
        images[start : start + len(batch)] = batch
        sizes[start : start + len(batch)] = batch_sizes
        start += len(batch)
    return images, sizes


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


def disk_cache(items: SplitItems, side: int, folder: Path, *, workers: int = 0, progress: bool = False,
               log: Callable[[str], None] = print) -> Tuple[torch.Tensor, torch.Tensor, Path]:
    """The decoded images of ``items`` (:func:`decode_all`), memory-mapped
    from ``<folder>/decoded-images-<key>.u8`` (:func:`cache_key`; the int32
    sizes, then the uint8 images): reused when it is there and whole, also
    by other runs on the same training images (a sweep's losses and
    backbones at one profile share one file), else decoded and written
    atomically (a crash leaves no partial file)."""
    path = Path(folder) / f"decoded-images-{cache_key(items, side)[:16]}.u8"
    count = len(items.refs)
    shape, sizes_bytes = (count, 3, int(side), int(side)), count * 2 * 4
    if path.is_file() and path.stat().st_size == sizes_bytes + int(np.prod(shape)):
        log(f"reusing the decoded images in {path}")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        images, sizes = decode_all(items, side, workers=workers, progress=progress)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(sizes.numpy().astype("<i4").tobytes())
                images.numpy().tofile(handle)
        log(f"decoded {count} images into {path} ({path.stat().st_size / 1e6:.1f} MB)")
    sizes = np.memmap(path, dtype="<i4", mode="c", shape=(count, 2))
    images = np.memmap(path, dtype=np.uint8, mode="c", shape=shape, offset=sizes_bytes)
    return torch.from_numpy(images), torch.from_numpy(np.asarray(sizes, dtype=np.int32)), path


class DecodedImages:
    """Every image of ``items`` decoded once, resized to ``side`` x ``side``:
    ``images`` uint8 (N, 3, side, side), ``sizes`` int32 (N, 2) (width,
    height before resizing) and ``labels`` int64 (N,), on ``device`` ("cpu"
    for RAM). Decoding runs through a DataLoader with ``workers`` processes,
    with a progress bar when ``progress``."""

    def __init__(self, items: SplitItems, side: int, *, device: Any = "cpu", workers: int = 0,
                 progress: bool = False, decoded: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> None:
        images, sizes = decode_all(items, side, workers=workers, progress=progress) if decoded is None else decoded
        self.images = images.to(device)
        self.sizes = sizes.to(device)
        self.labels = torch.as_tensor(items.labels, dtype=torch.int64, device=device)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, indices: Sequence[int], batch_size: int, *,
                drop_last: bool) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(uint8 images, sizes, labels) of ``indices`` in batches of
        ``batch_size``, as a DataLoader over them would give them."""
        order = torch.as_tensor(list(indices), dtype=torch.int64)
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for start in range(0, stop, batch_size):
            chosen = order[start : start + batch_size].to(self.images.device)
            yield (self.images.index_select(0, chosen), self.sizes.index_select(0, chosen),
                   self.labels.index_select(0, chosen))


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

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The batch augmented with fresh draws (``sizes``, the sizes before caching, play no part here)."""
        return self.apply(images, **self.draw(len(images), generator))


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """torchvision's rgb_to_grayscale of float (B, 3, H, W): (B, 1, H, W)."""
    return (0.2989 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).unsqueeze(1)


#: ColorJitter's adjustments, in torchvision's order; each blends an image with a target
#: (torchvision's _blend): black, the mean of its grayscale, its grayscale.
JITTERS = ("brightness", "contrast", "saturation")


def _jitter_targets(images: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """Each image's blend target for adjustment ``which`` (B,) (an index into :data:`JITTERS`), (B, 1, H, W)."""
    gray = _grayscale(images)
    which = which.view(-1, 1, 1, 1)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    return torch.where(which == 2, gray, torch.where(which == 1, mean, torch.zeros_like(mean)))


class RandomResizedCropFlip:
    """timm's training augmentation above 64 px (``create_transform(is_training=True)``)
    on uint8 batches cached at :func:`cache_side`: the random-resized crop of
    Szegedy et al. (2015) with timm's draws (area fraction uniform on
    ``scale``, log aspect ratio uniform on ``ratio``, the first of ten
    attempts that fits, else the centre crop clamped to ``ratio``), drawn in
    each image's pixels before caching and read from the cached image by
    ``interpolation`` (bilinear or bicubic, no antialiasing: the cache is
    at most 1 / crop_pct larger than the output); a horizontal flip with
    probability 1/2; torchvision's ColorJitter of brightness, contrast and
    saturation by factors uniform on 1 -/+ ``jitter``, in an order drawn
    per image; the normalisation (:class:`BatchNormalize`)."""

    attempts = 10

    def __init__(self, side: int, mean: Sequence[float], std: Sequence[float], *, interpolation: str = "bilinear",
                 scale: Tuple[float, float] = (0.08, 1.0), ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                 jitter: float = 0.4) -> None:
        self.side = int(side)
        self.mode = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
        self.scale, self.ratio, self.jitter = tuple(scale), tuple(ratio), float(jitter)
        self.normalize = BatchNormalize(mean, std)

    def draw(self, sizes: torch.Tensor, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """Crop boxes (top, left, height, width, in pixels of each image
        before caching), flips and jitter (factors (B, 3), order (B, 3): a
        permutation of 0, 1, 2 per image) for images of ``sizes`` (B, 2)."""
        device, batch = generator.device, len(sizes)
        width, height = sizes[:, 0].to(device, torch.float64), sizes[:, 1].to(device, torch.float64)

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return low + (high - low) * torch.rand(*shape, generator=generator, device=device, dtype=torch.float64)

        target = uniform(*self.scale, batch, self.attempts) * (width * height)[:, None]
        aspect = torch.exp(uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), batch, self.attempts))
        box_w, box_h = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
        fits = (box_w <= width[:, None]) & (box_h <= height[:, None])
        first = fits.to(torch.int8).argmax(dim=1, keepdim=True)
        found = fits.any(dim=1)
        box_w, box_h = box_w.gather(1, first)[:, 0], box_h.gather(1, first)[:, 0]
        place = torch.rand(batch, 2, generator=generator, device=device, dtype=torch.float64)
        top, left = torch.floor(place[:, 0] * (height - box_h + 1)), torch.floor(place[:, 1] * (width - box_w + 1))
        in_ratio = width / height
        low, high = min(self.ratio), max(self.ratio)
        centre_w = torch.where(in_ratio > high, torch.round(height * high), width)
        centre_h = torch.where(in_ratio < low, torch.round(width / low), height)
        box_w, box_h = torch.where(found, box_w, centre_w), torch.where(found, box_h, centre_h)
        top = torch.where(found, top, torch.div(height - centre_h, 2, rounding_mode="floor"))
        left = torch.where(found, left, torch.div(width - centre_w, 2, rounding_mode="floor"))
        return {
            "top": top, "left": left, "height": box_h, "width": box_w,
            "flip": torch.rand(batch, generator=generator, device=device) < 0.5,
            "factors": uniform(1 - self.jitter, 1 + self.jitter, batch, len(JITTERS)).to(torch.float32),
            "order": torch.rand(batch, len(JITTERS), generator=generator, device=device).argsort(dim=1),
        }

    def crop(self, images: torch.Tensor, sizes: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
             height: torch.Tensor, width: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """The boxes resized to side x side (flipped where ``flip``), float in [0, 1]."""
        device = images.device
        full_w, full_h = sizes[:, 0].to(device, torch.float64), sizes[:, 1].to(device, torch.float64)
        top, left, height, width = (value.to(device, torch.float64) for value in (top, left, height, width))
        # The affine map from the output's normalised coordinates to the image's (align_corners=False):
        # output pixel u samples the original at left + (u + 1/2) * width / side, in every image's own
        # pixels, which the cached image spans in the same normalised coordinates.
        theta = torch.zeros(len(images), 2, 3, dtype=torch.float64, device=device)
        theta[:, 0, 0] = torch.where(flip.to(device), -1.0, 1.0) * width / full_w
        theta[:, 0, 2] = (2 * left + width) / full_w - 1
        theta[:, 1, 1] = height / full_h
        theta[:, 1, 2] = (2 * top + height) / full_h - 1
        grid = torch.nn.functional.affine_grid(theta.to(torch.float32), [len(images), 3, self.side, self.side],
                                               align_corners=False)
        out = torch.nn.functional.grid_sample(images.to(torch.float32), grid, mode=self.mode,
                                              padding_mode="border", align_corners=False)
        return out.clamp_(0.0, 255.0).div_(255.0)

    def color(self, images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """ColorJitter on float images in [0, 1]: at each of the three places
        of ``order``, each image is blended with the target of the adjustment
        drawn there by that adjustment's factor, clamped to [0, 1]."""
        factors, order = factors.to(images.device), order.to(images.device)
        for place in range(order.shape[1]):
            which = order[:, place]
            factor = factors.gather(1, which[:, None]).view(-1, 1, 1, 1)
            images = (factor * images + (1.0 - factor) * _jitter_targets(images, which)).clamp_(0.0, 1.0)
        return images

    def apply(self, images: torch.Tensor, sizes: torch.Tensor, *, top: torch.Tensor, left: torch.Tensor,
              height: torch.Tensor, width: torch.Tensor, flip: torch.Tensor, factors: torch.Tensor,
              order: torch.Tensor) -> torch.Tensor:
        """The augmented, normalised batch for the given draws."""
        cropped = self.crop(images, sizes, top, left, height, width, flip)
        jittered = self.color(cropped, factors, order)
        return jittered.sub_(self.normalize.mean.to(images.device)).div_(self.normalize.std.to(images.device))

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, sizes, **self.draw(sizes, generator))


def augmentation_for(data_config: Mapping[str, Any]) -> Any:
    """The batch augmentation that matches the per-image training transform at this input size."""
    side = int(data_config["input_size"][-1])
    if side <= PAD_CROP_MAX_SIDE:
        return PadCropFlip(side, data_config["mean"], data_config["std"])
    return RandomResizedCropFlip(side, data_config["mean"], data_config["std"],
                                 interpolation=str(data_config.get("interpolation") or "bilinear"))


def epoch_generator(device: torch.device, seed: int, epoch: int, rank: int) -> torch.Generator:
    """The augmentation's generator of one epoch, on ``device``: a function of (seed, epoch, rank)."""
    generator = torch.Generator(device=device)
    generator.manual_seed((int(seed) * 1_000_003 + int(epoch)) * 1_009 + int(rank))
    return generator


def cache_for(mode: str, items: SplitItems, side: int, *, device: torch.device, workers: int, progress: bool,
              disk_folder: Optional[Path] = None, log: Callable[[str], None] = print) -> Optional[DecodedImages]:
    """The decoded training images of a concrete ``mode`` (None for "off";
    :func:`resolve_cache_mode` for "auto"); "disk" keeps them in a file in
    ``disk_folder`` (:func:`disk_cache`)."""
    if mode == "off":
        return None
    if mode == "disk":
        if disk_folder is None:
            raise ConfigError("--cache-images disk needs a place for its file: give the run a checkpoint path")
        images, sizes, _ = disk_cache(items, side, disk_folder, workers=workers, progress=progress, log=log)
        return DecodedImages(items, side, decoded=(images, sizes))
    return DecodedImages(items, side, device=device if mode == "device" else "cpu", workers=workers,
                         progress=progress)
