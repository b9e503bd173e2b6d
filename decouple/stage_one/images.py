"""Image decoding through the source that owns each reference, the decode
check that drops unreadable images, each image's fingerprint, and the
map-style :class:`ImageDataset`."""

from __future__ import annotations

import concurrent.futures
from typing import Callable, Dict, Optional, Sequence

import numpy as np
from PIL import Image

from decouple.errors import DataError
from decouple.stage_one.manifest import Manifest, SplitItems
from decouple.stage_one.sources import decoder_for


def load_image(ref: str) -> Image.Image:
    """A PIL RGB image from a file path or a source's own reference (e.g. ``PICKLE#INDEX``)."""
    return decoder_for(ref).load_image(ref)


def image_problem(ref: str) -> Optional[str]:
    """None if ``ref`` decodes, else a short reason."""
    return decoder_for(ref).image_problem(ref)


def find_bad_images(refs: Sequence[str], *, workers: int = 4) -> Dict[str, str]:
    """ref -> reason for every reference that does not decode."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems = list(pool.map(image_problem, refs, chunksize=256))
    return {ref: problem for ref, problem in zip(refs, problems) if problem}


def native_image_size(refs: Sequence[str], *, sample: int = 16) -> int:
    """Median longer side of up to ``sample`` evenly spaced images."""
    picks = [refs[i] for i in np.linspace(0, len(refs) - 1, min(sample, len(refs))).astype(int)]
    sides = []
    for ref in picks:
        try:
            sides.append(decoder_for(ref).image_side(ref))
        except Exception:
            continue
    return int(np.median(sides)) if sides else 224


#: Side of the grey thumbnail a fingerprint is computed on, and of its low-frequency block.
FINGERPRINT_THUMBNAIL = 32
FINGERPRINT_BLOCK = 8
# The first FINGERPRINT_BLOCK rows of the orthonormal DCT-II matrix of size FINGERPRINT_THUMBNAIL.
_DCT = np.sqrt(2.0 / FINGERPRINT_THUMBNAIL) * np.cos(
    np.pi * np.arange(FINGERPRINT_BLOCK)[:, None] * (2 * np.arange(FINGERPRINT_THUMBNAIL)[None, :] + 1)
    / (2 * FINGERPRINT_THUMBNAIL)
)
_DCT[0] /= np.sqrt(2.0)


def image_fingerprints(image: Image.Image) -> np.ndarray:
    """The perceptual hash of ``image`` and of its horizontal mirror, (2,) uint64.

    The DCT hash of Zauner ("Implementation and Benchmarking of Perceptual
    Image Hash Functions", 2010): the image in grey, resized to 32 x 32 (box
    filter), its 2-D DCT-II, the 8 x 8 lowest frequencies without the DC
    term, one bit per coefficient above their median (63 bits). Re-encoding,
    resizing or mild noise moves few bits; different photographs differ in
    about half. The mirror's hash is that of the mirrored image, resized on
    its own (a box resize at a non-integer scale is not mirror-symmetric), so
    a flipped copy's own hash equals its source's mirrored one exactly, at
    any size. A near-uniform image hashes little more than rounding noise.
    Stored by ``decouple extract`` for every image, it is what split health
    finds near-duplicates across splits by (:mod:`decouple.split_health`).
    """
    side = FINGERPRINT_THUMBNAIL
    grey = image.convert("L")
    values = []
    for view in (grey, grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT)):
        thumbnail = np.asarray(view.resize((side, side), Image.Resampling.BOX), dtype=np.float64)
        block = _DCT @ thumbnail @ _DCT.T  # the 8 x 8 lowest frequencies of the 2-D DCT-II
        values.append(block.ravel()[1:])  # without the DC term
    values = np.stack(values)  # (2, 63)
    bits = values > np.median(values, axis=1, keepdims=True)
    padded = np.concatenate([np.zeros((2, 1), dtype=bool), bits], axis=1)  # 64 bits, the first 0
    return np.packbits(padded, axis=1).view(">u8").astype(np.uint64).ravel()


def drop_bad_images(manifest: Manifest, *, strict: bool = False, workers: int = 4) -> Manifest:
    """Check every image decodes; drop and list the bad ones, or raise with ``strict``."""
    refs = sorted({ref for items in manifest.splits.values() for ref in items.refs})
    bad = find_bad_images(refs, workers=workers)
    if not bad:
        manifest.info["skipped_images"] = []
        return manifest
    first = sorted(bad)[0]
    if strict:
        raise DataError(
            f"{first}: cannot be decoded ({bad[first]}); {len(bad)} bad image(s) in all, "
            f"fatal under --strict"
        )
    splits = {}
    for name, items in manifest.splits.items():
        keep = [i for i, ref in enumerate(items.refs) if ref not in bad]
        splits[name] = items.subset(keep)
    counts = np.bincount(splits["train"].labels, minlength=manifest.num_classes)
    if (counts == 0).any():
        empty = int(np.flatnonzero(counts == 0)[0])
        raise DataError(
            f"class {manifest.class_names[empty]!r} has no readable training image once "
            f"{len(bad)} bad image(s) are skipped (first: {first})"
        )
    info = dict(manifest.info, skipped_images=sorted(bad))
    return Manifest(manifest.class_names, {k: v for k, v in splits.items() if len(v)}, info)


class ImageDataset:
    """A map-style dataset over one split: (transform(image), label), and the
    image's :func:`image_fingerprints` as int64 (2,) with ``fingerprints``."""

    def __init__(self, items: SplitItems, transform: Optional[Callable] = None, *, fingerprints: bool = False) -> None:
        self.refs = items.refs
        self.labels = items.labels
        self.transform = transform
        self.fingerprints = fingerprints

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int):
        ref = self.refs[index]
        try:
            image = load_image(ref)
        except Exception as exc:
            raise DataError(f"{ref}: cannot be decoded ({type(exc).__name__}: {exc})") from None
        hashes = image_fingerprints(image).view(np.int64) if self.fingerprints else None
        if self.transform is not None:
            image = self.transform(image)
        if hashes is not None:
            return image, int(self.labels[index]), hashes
        return image, int(self.labels[index])
