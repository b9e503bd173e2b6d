"""Data sources: a registry of the kinds of image collections ``--data`` may name.

A source is one registered :class:`Source` subclass. It says whether a path is
its kind (:meth:`Source.detect`), lists the images and class names there
(:meth:`Source.load`) and, for references that are not plain image files,
decodes them (:meth:`Source.decodes`, :meth:`Source.load_image`). A new
source is one class with ``@register_source("name")`` and no edit elsewhere.
Detection tries the newest registration first, so a new, more specific source
wins over the general ones registered before it (``image_folder`` takes any
folder and is registered before ``split_folders`` and ``cifar``).

An archive of any of these (.tar, .tar.gz, .tar.xz, ...) is unpacked once
into a cache folder by :func:`unpack_archive` and read from there.
"""

from __future__ import annotations

import functools
import os
import pickle
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Type, Union

import numpy as np
from PIL import Image

from decouple.atomic import commit, temporary_sibling
from decouple.errors import DataError, first_line
from decouple.provenance import file_sha256
from decouple.registry import Registry
from decouple.stage_one.manifest import PathLike, SplitItems, is_indexed_ref, natural_key, read_manifest

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")

SOURCES = Registry("data source")
register_source = SOURCES.register


@dataclass
class SourceData:
    """What a source found: class names and one or more splits (``all`` when unsplit)."""

    class_names: List[str]
    splits: Dict[str, SplitItems]
    location: str


class ImageFiles:
    """Decoding of references that are image files (what most sources list)."""

    @classmethod
    def load_image(cls, ref: str) -> Image.Image:
        """A PIL RGB image."""
        with Image.open(ref) as image:
            return image.convert("RGB")

    @classmethod
    def image_problem(cls, ref: str) -> Optional[str]:
        """None if ``ref`` decodes, else a short reason. Large JPEGs decode at reduced scale."""
        try:
            with Image.open(ref) as image:
                image.draft("RGB", (64, 64))
                image.load()
            return None
        except Exception as exc:
            return (str(exc).splitlines() or [type(exc).__name__])[0][:80] or type(exc).__name__

    @classmethod
    def image_side(cls, ref: str) -> int:
        """The longer side in pixels, from the file's header."""
        with Image.open(ref) as image:
            return max(image.size)


class Source:
    """A kind of image collection. Subclasses override :meth:`detect` and
    :meth:`load`; one whose references are not image files also overrides
    :meth:`decodes` and :meth:`load_image`."""

    @classmethod
    def detect(cls, path: Path) -> bool:
        """True when ``path`` (which exists) is this source's kind."""
        return False

    @classmethod
    def load(cls, path: Path) -> SourceData:
        """Class names and splits (``all`` when unsplit) found at ``path``."""
        raise NotImplementedError(f"{cls.__name__}.load")

    @classmethod
    def decodes(cls, ref: str) -> bool:
        """True when this source, not a plain file read, decodes ``ref``."""
        return False

    @classmethod
    def load_image(cls, ref: str) -> Image.Image:
        """A PIL RGB image of one of this source's own references."""
        raise NotImplementedError(f"{cls.__name__}.load_image")

    @classmethod
    def image_problem(cls, ref: str) -> Optional[str]:
        """None if ``ref`` decodes, else the error's name."""
        try:
            cls.load_image(ref)
            return None
        except Exception as exc:
            return type(exc).__name__

    @classmethod
    def image_side(cls, ref: str) -> int:
        """The longer side in pixels."""
        return max(cls.load_image(ref).size)


# --------------------------------------------------------------------------- manifest CSV


@register_source("manifest")
class ManifestSource(Source):
    """A CSV of ``path,label[,split[,group]]`` rows (or those columns named by a
    header, in any order); relative paths are relative to the CSV. A group
    column makes the carved splits group-disjoint from train (see splits)."""

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() in (".csv", ".txt")

    @classmethod
    def load(cls, path: Path) -> SourceData:
        manifest = read_manifest(path)
        return SourceData(manifest.class_names, manifest.splits, str(path))


# --------------------------------------------------------------------------- folders


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _class_dirs(root: Path) -> List[Path]:
    return sorted(
        (entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")),
        key=lambda entry: natural_key(entry.name),
    )


def _scan_class_folders(root: Path) -> Dict[str, List[str]]:
    found = {}
    for folder in _class_dirs(root):
        images = sorted(
            str(Path(dirpath) / name)
            for dirpath, _, names in os.walk(folder, followlinks=True)
            for name in names
            if _is_image(name)
        )
        if not images:
            raise DataError(
                f"{folder}: class folder {folder.name!r} holds no images; "
                f"expected files ending in {', '.join(IMAGE_EXTENSIONS[:5])}, ..."
            )
        found[folder.name] = images
    return found


def _labelled(found: Dict[str, List[str]], index: Dict[str, int]) -> SplitItems:
    refs, labels = [], []
    for name, images in found.items():
        refs += images
        labels += [index[name]] * len(images)
    return SplitItems(refs, labels)


@register_source("image_folder")
class ImageFolder(Source):
    """``ROOT/<class>/*.jpg|png|...``: one folder per class (nested folders allowed)."""

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_dir()

    @classmethod
    def load(cls, path: Path) -> SourceData:
        root = Path(path)
        found = _scan_class_folders(root)
        if not found:
            raise DataError(f"{root}: no class folders; expected ROOT/<class>/<image> files")
        index = {name: i for i, name in enumerate(found)}
        return SourceData(list(found), {"all": _labelled(found, index)}, str(root))


@register_source("split_folders")
class SplitFolders(Source):
    """``ROOT/train|val|test/<class>/...``: already split; classes from train."""

    @classmethod
    def detect(cls, path: Path) -> bool:
        return (path / "train").is_dir() and bool(_class_dirs(path / "train"))

    @classmethod
    def load(cls, path: Path) -> SourceData:
        root = Path(path)
        per_split = {
            split: _scan_class_folders(root / split)
            for split in ("train", "val", "test")
            if (root / split).is_dir()
        }
        if "train" not in per_split or not per_split["train"]:
            raise DataError(f"{root}/train: no class folders; expected ROOT/train/<class>/<image> files")
        class_names = list(per_split["train"])
        index = {name: i for i, name in enumerate(class_names)}
        splits = {}
        for split, found in per_split.items():
            unknown = sorted(set(found) - set(index))
            if unknown:
                raise DataError(
                    f"{root / split / unknown[0]}: class {unknown[0]!r} has no folder under {root / 'train'}; "
                    f"every class needs training images"
                )
            splits[split] = _labelled(found, index)
        return SourceData(class_names, splits, str(root))


# --------------------------------------------------------------------------- CIFAR pickles


_CIFAR_LAYOUTS = {
    # meta file, label-names key, labels key, train files, test files
    "cifar10": ("batches.meta", "label_names", "labels", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": ("meta", "fine_label_names", "fine_labels", ["train"], ["test"]),
}


def _cifar_layout(root: Path) -> Optional[str]:
    for name, (meta, _, _, train_files, test_files) in _CIFAR_LAYOUTS.items():
        if all((root / f).is_file() for f in [meta] + train_files + test_files):
            return name
    return None


@functools.lru_cache(maxsize=8)
def _unpickle(path: str) -> Dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            raw = pickle.load(handle, encoding="bytes")
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as a CIFAR python pickle ({type(exc).__name__})") from None
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in raw.items()}


@register_source("cifar")
class CifarPickles(Source):
    """The CIFAR-10/100 "python version" folders (``cifar-10-batches-py``, ``cifar-100-python``).

    Read here rather than by torchvision's CIFAR10/CIFAR100, which check the
    official files' md5 sums and take the parent folder, so refuse any other
    CIFAR-style folder this source accepts.
    """

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_dir() and _cifar_layout(path) is not None

    @classmethod
    def load(cls, path: Path) -> SourceData:
        root = Path(path)
        layout = _cifar_layout(root)
        if layout is None:
            raise DataError(
                f"{root}: not a CIFAR python folder; expected data_batch_1..5 + test_batch + batches.meta "
                f"(CIFAR-10) or train + test + meta (CIFAR-100)"
            )
        meta_file, names_key, labels_key, train_files, test_files = _CIFAR_LAYOUTS[layout]
        class_names = [
            name.decode() if isinstance(name, bytes) else str(name)
            for name in _unpickle(str(root / meta_file))[names_key]
        ]
        splits = {}
        for split, files in (("train", train_files), ("test", test_files)):
            refs, labels = [], []
            for file_name in files:
                batch = _unpickle(str(root / file_name))
                batch_labels = batch.get(labels_key)
                if batch_labels is None or "data" not in batch:
                    raise DataError(f"{root / file_name}: CIFAR batch lacks 'data' or {labels_key!r}")
                refs += [f"{root / file_name}#{i}" for i in range(len(batch_labels))]
                labels += list(batch_labels)
            splits[split] = SplitItems(refs, labels)
        return SourceData(class_names, splits, str(root))

    @classmethod
    def decodes(cls, ref: str) -> bool:
        return is_indexed_ref(ref) and not os.path.exists(ref)

    @classmethod
    def load_image(cls, ref: str) -> Image.Image:
        """Row INDEX of a ``PICKLE#INDEX`` reference: 3072 bytes, channel-major 32x32."""
        file_part, index = ref.rsplit("#", 1)
        row = np.asarray(_unpickle(file_part)["data"][int(index)], dtype=np.uint8)
        return Image.fromarray(row.reshape(3, 32, 32).transpose(1, 2, 0))

    @classmethod
    def image_side(cls, ref: str) -> int:
        return 32


# --------------------------------------------------------------------------- archives


def archive_suffix(path: PathLike) -> Optional[str]:
    """The archive suffix ``path`` ends in (".tar.xz"), or None for another file."""
    name = Path(path).name.lower()
    return next((suffix for suffix in ARCHIVE_SUFFIXES if name.endswith(suffix)), None)


def unpack_archive(path: PathLike, cache_root: PathLike) -> Path:
    """The data folder of the tar archive ``path``, unpacked once into
    ``cache_root/<name>-<sha256 prefix>`` and reused while the archive's
    content stays the same: its single top-level folder, when it has only
    that. Unpacked into a temporary sibling first and renamed, so a crash or
    a full disk never leaves a half-unpacked folder to be reused."""
    path = Path(path)
    suffix = archive_suffix(path)
    if suffix is None or not path.is_file():
        raise DataError(f"{path}: expected a .tar, .tar.gz or .tar.xz archive of an image folder")
    target = Path(cache_root) / f"{path.name[: -len(suffix)]}-{file_sha256(path)[:12]}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(target)
        shutil.rmtree(tmp, ignore_errors=True)
        # "data": no absolute paths, links out of the folder or device files (where Python has it)
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        try:
            with tarfile.open(path) as archive:
                archive.extractall(tmp, **safe)
            commit(tmp, target)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if target.is_dir():  # another process unpacked the same archive meanwhile
                return _archive_root(target)
            if isinstance(exc, Exception):
                raise DataError(f"{path}: cannot be unpacked into {target} ({first_line(exc)})") from None
            raise
    return _archive_root(target)


def _archive_root(folder: Path) -> Path:
    """``folder``, or its single visible entry when that is a folder (``cifar10/`` of cifar10-jpg.tar.xz)."""
    entries = [entry for entry in folder.iterdir() if not entry.name.startswith(".")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else folder


# --------------------------------------------------------------------------- lookup


def source_class(name: str) -> Type[Source]:
    """The registered :class:`Source` subclass called ``name``."""
    return SOURCES.get(name)


def detect_source(path: PathLike) -> str:
    """Which registered source reads ``path``: the newest registered that detects it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder")
    for name in reversed(SOURCES.names()):
        if source_class(name).detect(path):
            return name
    if path.is_file() and archive_suffix(path):
        raise DataError(f"--data {path}: an archive; unpack it first (a sweep's stage_one.data unpacks it once)")
    if path.is_file():
        raise DataError(f"--data {path}: a file must be a CSV manifest (path,label[,split])")
    raise DataError(f"--data {path}: no data source reads this folder; known: {', '.join(SOURCES)}")


def load_source(path: PathLike, *, source: str = "auto") -> SourceData:
    """Read ``path`` with the named source (``auto`` detects it)."""
    name = detect_source(path) if source == "auto" else SOURCES.check(source, where="--source")
    data = source_class(name).load(Path(path))
    if len(data.class_names) < 2:
        found = f"a single class {data.class_names[0]!r}" if data.class_names else "no class"
        raise DataError(f"--data {path}: found {found}; recognition needs at least two classes")
    return data


def decoder_for(ref: str) -> Union[Type[Source], Type[ImageFiles]]:
    """The source that decodes ``ref``, else :class:`ImageFiles` (a plain image
    file); asked newest registered first, as :func:`detect_source` is."""
    for name in reversed(SOURCES.names()):
        if source_class(name).decodes(ref):
            return source_class(name)
    return ImageFiles
