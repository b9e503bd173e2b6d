"""Stage one end to end: data -> backbone -> fine-tune -> embeddings of every split.

:func:`run_extract` is what ``decouple extract`` calls. Embeddings are taken
before the classifier (timm ``forward_head(pre_logits=True)``) with the
evaluation transform, for every split of the manifest, and written to one
decouple-features v1 file through :class:`~decouple.features.FeatureWriter`
(a temporary file renamed at the end). Under torchrun each rank embeds a
shard of every split; rank 0 gathers and writes, in manifest order, so the
file is the same whatever the number of processes. ``views=K`` adds
/train/views (N, K, D): K embeddings of each training image under the
training augmentation.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from decouple.atomic import commit
from decouple.errors import ConfigError, DecoupleError, first_line
from decouple.features import Classifier, FeatureWriter
from decouple.provenance import jsonable, package_versions
from decouple.split_health import check_file
from decouple.stage_one.backbones import (
    WeightsReport,
    check_backbone,
    create_backbone,
    embed,
    embedding_dim,
    has_fixed_input_size,
    model_input_size,
    state_dict_sha256,
)
from decouple.stage_one.distributed import (
    DistInfo,
    broadcast_from_main,
    default_workers,
    init_distributed,
    shutdown_distributed,
)
from decouple.stage_one.finetune import (
    EpochStats,
    FinetuneConfig,
    data_config_for,
    finetune,
    is_disk_full,
    make_transform,
    make_uint8_transform,
    seed_everything,
)
from decouple.stage_one.images import ImageDataset, native_image_size
from decouple.stage_one.manifest import Manifest, SplitItems, save_manifest
from decouple.stage_one.splits import SplitOptions, prepare_manifest
from decouple.stage_two.losses import LOSSES
from decouple.stage_two.samplers import SAMPLERS

DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class ExtractConfig:
    """Everything ``decouple extract`` takes; stored as JSON in the feature file
    (the split options flat beside the others). ``split.seed`` also seeds the
    backbone's initialisation and the augmented views."""

    data: str
    backbone: str = "resnet32_cifar"
    source: str = "auto"
    pretrained: bool = False
    weights: Optional[str] = None
    split: SplitOptions = field(default_factory=SplitOptions)
    strict: bool = False
    check_images: bool = True
    img_size: Union[int, str] = "auto"
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval_batch_size: Optional[int] = None
    views: int = 0
    dtype: str = "float16"
    out: Optional[str] = None
    run: Optional[str] = None
    features_dir: str = "features"
    checkpoint: Optional[str] = None
    resume: bool = False
    device: str = "auto"


@dataclass
class ExtractResult:
    """What a run wrote and how it went."""

    path: str
    manifest_path: str
    checkpoint_path: Optional[str]
    backbone: str
    img_size: int
    dim: int
    num_classes: int
    splits: Dict[str, int]
    weights_sha256: str
    world_size: int
    seconds: float
    history: List[Dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- naming


def default_run_name(data: str, backbone: str, imbalance: Optional[float], train_profile: str = "long_tailed") -> str:
    """``<data folder>_<backbone>[_lt<IF>]`` (``_balanced_lt<IF>`` for the balanced
    sibling of that profile), filesystem-safe."""
    stem = Path(os.path.abspath(data)).name
    if Path(data).suffix.lower() in (".csv", ".txt"):
        stem = Path(data).stem
    balanced = "_balanced" if train_profile == "balanced" else ""
    name = f"{stem}_{backbone}" + (f"{balanced}_lt{imbalance:g}" if imbalance is not None else "")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def output_paths(config: ExtractConfig) -> Dict[str, Path]:
    """Feature file, manifest CSV and checkpoint paths of a run."""
    if config.out:
        out = Path(config.out)
    else:
        run = config.run or default_run_name(
            config.data, config.backbone, config.split.imbalance, config.split.train_profile
        )
        out = Path(config.features_dir) / f"{run}.h5"
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    manifest = out.with_name(f"{stem}.manifest.csv")
    checkpoint = Path(config.checkpoint) if config.checkpoint else out.with_name(f"{stem}.ckpt.pt")
    return {"out": out, "manifest": manifest, "checkpoint": checkpoint}


def resolve_img_size(img_size: Union[int, str], model: nn.Module, manifest: Manifest, *, pretrained: bool) -> int:
    """``auto``: the model's input size when it is pretrained or takes only that
    size, else the data's own size if smaller (no upsampling of small images
    for a model trained from scratch); ``model``: the model's; an int: that."""
    model_size = model_input_size(model)
    if isinstance(img_size, str) and img_size.isdigit():
        img_size = int(img_size)
    if isinstance(img_size, int):
        if img_size < 8:
            raise ConfigError(f"--img-size must be at least 8 pixels; got {img_size}")
        if has_fixed_input_size(model) and img_size != model_size:
            raise ConfigError(f"--img-size {img_size}: {type(model).__name__} takes only {model_size} px inputs")
        return img_size
    if img_size == "model":
        return model_size
    if img_size != "auto":
        raise ConfigError(f"--img-size must be auto, model or a number of pixels; got {img_size!r}")
    if pretrained or has_fixed_input_size(model):
        return model_size
    return min(model_size, native_image_size(manifest.splits["train"].refs))


# --------------------------------------------------------------------------- sharded embedding


def shard_batches(n: int, *, world_size: int, rank: int, batch_size: int) -> List[range]:
    """This rank's batch of each chunk of ``world_size * batch_size`` rows (possibly empty)."""
    chunk = world_size * batch_size
    return [
        range(min(start + rank * batch_size, n), min(start + (rank + 1) * batch_size, n))
        for start in range(0, n, chunk)
    ]


@torch.no_grad()
def embed_split(
    model: nn.Module,
    items: SplitItems,
    transform: Callable,
    *,
    dist: DistInfo,
    batch_size: int,
    workers: int,
    write: Callable[[int, np.ndarray], None],
    amp: bool = True,
    channels_last: bool = True,
    generator: Optional[torch.Generator] = None,
    write_fingerprints: Optional[Callable[[int, np.ndarray], None]] = None,
    normalize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> None:
    """Embed ``items`` sharded over ranks; rank 0 gets ``write(start_row, block (b, D))`` in order,
    and with ``write_fingerprints``, ``write_fingerprints(start_row, (b, 2) uint64)``: each
    image's :func:`~decouple.stage_one.images.image_fingerprints`, computed as it is decoded.
    ``normalize``: applied to each batch on the device, for a ``transform`` that
    gives uint8 images (:func:`~decouple.stage_one.finetune.make_uint8_transform`)."""
    n = len(items)
    device = dist.device
    on_cuda = device.type == "cuda"
    batches = shard_batches(n, world_size=dist.world_size, rank=dist.rank, batch_size=batch_size)
    loader = torch.utils.data.DataLoader(
        ImageDataset(items, transform, fingerprints=write_fingerprints is not None),
        batch_sampler=[list(batch) for batch in batches if len(batch)],
        num_workers=workers,
        pin_memory=on_cuda,
        generator=generator,
    )
    dim = embedding_dim(model)
    memory_format = torch.channels_last if on_cuda and channels_last else torch.contiguous_format
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda and amp else contextlib.nullcontext()
    iterator = iter(loader)
    for chunk_index, batch in enumerate(batches):
        block = torch.zeros(batch_size, dim, device=device)
        hashes = torch.zeros(batch_size, 2, dtype=torch.int64, device=device)
        if len(batch):
            images, _, *found = next(iterator)
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            if normalize is not None:
                images = normalize(images)
            with autocast:
                out = embed(model, images)
            block[: len(batch)] = out.float()
            if found:
                hashes[: len(batch)] = found[0].to(device)
        chunk_start = chunk_index * dist.world_size * batch_size
        rows = _gathered(block, n, chunk_index, dist=dist, batch_size=batch_size)
        hash_rows = _gathered(hashes, n, chunk_index, dist=dist, batch_size=batch_size) if write_fingerprints else None
        if dist.is_main:
            write(chunk_start, rows.cpu().numpy())
            if write_fingerprints is not None:
                write_fingerprints(chunk_start, hash_rows.cpu().numpy().view(np.uint64))


def _gathered(block: torch.Tensor, n: int, chunk_index: int, *, dist: DistInfo, batch_size: int) -> torch.Tensor:
    """Every rank's ``block`` of chunk ``chunk_index`` (all_gather under DDP), trimmed to
    the rows each rank really had, in rank order."""
    if dist.distributed:
        gathered = [torch.empty_like(block) for _ in range(dist.world_size)]
        torch.distributed.all_gather(gathered, block)
    else:
        gathered = [block]
    rows = []
    for rank, part in enumerate(gathered):
        valid = len(shard_batches(n, world_size=dist.world_size, rank=rank, batch_size=batch_size)[chunk_index])
        rows.append(part[:valid])
    return torch.cat(rows)


def _manifest_attr(manifest: Manifest, manifest_path: Path) -> Dict[str, Any]:
    summary = manifest.summary()
    skipped = summary.pop("skipped_images", [])
    summary.update(
        {
            "file": manifest_path.name,
            "sha256": manifest.sha256(),
            "skipped_images": len(skipped),
            "skipped_first": skipped[:20],
        }
    )
    summary.pop("class_names", None)
    summary.pop("reference_counts", None)  # /train/reference_counts holds them
    if len(json.dumps(summary, default=str)) > 60000:  # HDF5 attributes stop at 64 KiB
        summary.pop("counts", None)
    return summary


# --------------------------------------------------------------------------- the run


def run_extract(config: ExtractConfig, *, log: Callable[[str], None] = print) -> ExtractResult:
    """Build the splits, fine-tune, embed every split and write ``features/<run>.h5``.

    Bad input raises a DecoupleError before anything is written; a crash or a
    full disk leaves no feature file (the per-epoch checkpoint stays, for
    ``resume``). Under torchrun only rank 0 writes and logs.
    """
    started = time.perf_counter()
    ft_config = _check_config(config)
    paths = output_paths(config)
    dist = init_distributed(config.device)
    say = log if dist.is_main else (lambda message: None)
    try:
        workers = default_workers(dist.device, dist.local_world_size) if ft_config.workers is None else ft_config.workers
        manifest = broadcast_from_main(dist, lambda: _make_manifest(config, log))
        say(
            "data: "
            + ", ".join(f"{name} {len(items)}" for name, items in manifest.splits.items())
            + f" images, {manifest.num_classes} classes"
        )
        model, weights, img_size = _create_model(config, manifest, say)
        data_config = data_config_for(model, img_size)
        history: List[EpochStats] = []
        if ft_config.epochs > 0:
            fingerprint = {
                "backbone": config.backbone,
                "manifest_sha256": manifest.sha256(),
                "img_size": img_size,
                "weights_sha256": weights.sha256,
                "world_size": dist.world_size,
            }
            history = finetune(
                model, manifest, ft_config, data_config=data_config, dist=dist, checkpoint=paths["checkpoint"],
                resume=config.resume, fingerprint=fingerprint, log=say,
            )
        model.to(dist.device).eval()
        if dist.device.type == "cuda" and ft_config.channels_last:
            model.to(memory_format=torch.channels_last)
        dim = embedding_dim(model)
        classifier = own_classifier(
            model, next(iter(manifest.splits.values())), make_transform(data_config, is_training=False), ft_config,
            device=dist.device, say=say,
        ) if dist.is_main else None
        resolved = _resolved_config(config, ft_config, img_size=img_size, world_size=dist.world_size, workers=workers)
        attrs = _feature_attrs(config, manifest, model, weights, history, resolved=resolved, manifest_path=paths["manifest"])
        embed_rows = functools.partial(
            embed_split, model, dist=dist, batch_size=config.eval_batch_size or 2 * ft_config.batch_size,
            workers=workers, amp=ft_config.amp, channels_last=ft_config.channels_last,
        )
        _write_features(config, manifest, data_config, embed_rows, dim=dim, attrs=attrs, dist=dist, paths=paths, say=say,
                        classifier=classifier)
        if dist.is_main:
            _warn_leaky_splits(paths["out"], say)
        dist.barrier()
    finally:
        shutdown_distributed(dist)
    return ExtractResult(
        path=str(paths["out"]),
        manifest_path=str(paths["manifest"]),
        checkpoint_path=str(paths["checkpoint"]) if ft_config.epochs > 0 else None,
        backbone=config.backbone,
        img_size=img_size,
        dim=dim,
        num_classes=manifest.num_classes,
        splits={name: len(items) for name, items in manifest.splits.items()},
        weights_sha256=weights.sha256,
        world_size=dist.world_size,
        seconds=time.perf_counter() - started,
        history=[asdict(row) for row in history],
    )


def _warn_leaky_splits(path: Path, say: Callable[[str], None]) -> None:
    """One warning line per held-out split of the written file that looks leaky
    (:mod:`decouple.split_health`)."""
    try:
        report = check_file(path)
    except Exception as exc:  # a diagnostic never fails an extraction that has succeeded
        say(f"warning: split health check skipped ({first_line(exc)})")
        return
    for line in report.warnings():
        say(line)


def _check_config(config: ExtractConfig) -> FinetuneConfig:
    """Fail on a bad option, name or file before any data is read; the resolved fine-tune options."""
    if config.dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}; got {config.dtype!r}")
    if config.views < 0:
        raise ConfigError(f"--views must be >= 0; got {config.views}")
    ft_config = config.finetune.resolved()
    check_backbone(config.backbone)
    LOSSES.check(config.finetune.loss, where="--loss")
    SAMPLERS.check(config.finetune.sampler, where="--sampler")
    if config.pretrained and config.weights is not None:
        raise ConfigError("--pretrained and --weights exclude each other; pass one")
    if config.weights is not None and not Path(config.weights).is_file():
        raise DecoupleError(f"--weights {config.weights}: no such file")
    return ft_config


def _make_manifest(config: ExtractConfig, log: Callable[[str], None]) -> Manifest:
    """The run's splits (rank 0 builds them); unreadable images skipped and listed."""
    manifest = prepare_manifest(
        config.data, config.split, source=config.source, check_images=config.check_images, strict=config.strict
    )
    groups = manifest.info.get("groups")
    if groups:
        log(f"groups: {groups['count']} (from {groups['from']}); carved splits are group-disjoint from train")
        if groups.get("spanning_classes"):
            log(f"warning: {groups['spanning_classes']} group(s) hold images of several classes; each went whole "
                f"with its majority class")
        for split, absent in (groups.get("classes_missing") or {}).items():
            log(f"warning: {split} has no image of {len(absent)} class(es) ({', '.join(absent[:5])}"
                f"{', ...' if len(absent) > 5 else ''}): their images are in too few groups to spare one")
    short = manifest.info.get("profile", {}).get("short_classes")
    if short:
        log(f"warning: balanced train: {len(short)} class(es) have fewer than n_max images left and keep them all "
            f"({', '.join(short[:5])}{', ...' if len(short) > 5 else ''})")
    if manifest.train_profile == "balanced":
        log(f"balanced train; shot groups from the reference counts of the {manifest.reference_source}")
    skipped = manifest.info.get("skipped_images", [])
    if skipped:
        listing = ", ".join(skipped[:10]) + (f", ... ({len(skipped)} in all)" if len(skipped) > 10 else "")
        log(f"skipped {len(skipped)} unreadable image(s): {listing}")
    return manifest


def _create_model(
    config: ExtractConfig, manifest: Manifest, say: Callable[[str], None]
) -> Tuple[nn.Module, WeightsReport, int]:
    """The seeded backbone with its weights, and the input size it will see."""
    seed_everything(config.split.seed, 0)
    model, weights = create_backbone(
        config.backbone, num_classes=manifest.num_classes, pretrained=config.pretrained, weights=config.weights
    )
    if weights.mode == "position" or weights.skipped:
        say(
            f"weights: {weights.matched}/{weights.total} tensors loaded by {weights.mode}"
            + (f"; new {', '.join(weights.skipped)}" if weights.skipped else "")
        )
    pretrained = config.pretrained or config.weights is not None
    return model, weights, resolve_img_size(config.img_size, model, manifest, pretrained=pretrained)


def _resolved_config(config: ExtractConfig, ft_config: FinetuneConfig, **run: Any) -> Dict[str, Any]:
    """The config as stored in the feature file: split options flat, fine-tune options resolved."""
    resolved = jsonable(asdict(config))
    resolved.update(resolved.pop("split"))
    resolved["finetune"] = jsonable(asdict(ft_config))
    resolved.update(run)
    return resolved


def _feature_attrs(
    config: ExtractConfig, manifest: Manifest, model: nn.Module, weights: WeightsReport, history: List[EpochStats],
    *, resolved: Dict[str, Any], manifest_path: Path,
) -> Dict[str, Any]:
    """Provenance stored on the feature file: weights, config, versions, manifest, history."""
    return {
        "weights_sha256": weights.sha256,
        "weights": weights.as_dict(),
        "model_sha256": state_dict_sha256(model.state_dict()),
        "config": json.dumps(resolved, sort_keys=True, default=str),
        "versions": json.dumps(package_versions(), sort_keys=True),
        "manifest": json.dumps(_manifest_attr(manifest, manifest_path), sort_keys=True, default=str),
        "img_size": resolved["img_size"],
        "views": config.views,
        "history": json.dumps([asdict(row) for row in history]),
        "train_profile": config.split.train_profile,
    }


#: Images of the first batch on which the network's own classifier is checked.
CLASSIFIER_CHECK_IMAGES = 8


def _as_linear(head: Any) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(weight (C, D), bias (C,)) of a classifier that is one affine map of
    the embedding: an ``nn.Linear``, or a 1 x 1 ``nn.Conv2d`` on the pooled
    embedding (timm's ResNetV2 head); else None."""
    if isinstance(head, nn.Linear):
        weight = head.weight
    elif isinstance(head, nn.Conv2d) and tuple(head.kernel_size) == (1, 1) and head.groups == 1:
        weight = head.weight.flatten(1)
    else:
        return None
    bias = head.bias if head.bias is not None else torch.zeros(weight.shape[0], device=weight.device)
    return weight.detach().float(), bias.detach().float()


@torch.no_grad()
def own_classifier(
    model: nn.Module, items: SplitItems, transform: Callable, ft_config: FinetuneConfig, *,
    device: torch.device, say: Callable[[str], None],
) -> Optional[Classifier]:
    """The fine-tuned network's own classifier, to store as /classifier: the
    affine map of timm's ``get_classifier()`` (:func:`_as_linear`) when, on
    the first images of ``items``, it gives the network's logits from the
    stored embedding (:func:`embed`); else None, said in one line. None too
    for a run that trained nothing (epochs 0): its classifier is an
    initialisation, not a method to score."""
    if ft_config.epochs <= 0:
        say("classifier: not written (--epochs 0: the network's classifier was not trained)")
        return None
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    affine = _as_linear(head)
    if affine is None:
        say(f"classifier: not written (the network's classifier is {type(head).__name__}, not one affine map)")
        return None
    weight, bias = affine
    dataset = ImageDataset(items, transform)
    images = torch.stack([dataset[index][0] for index in range(min(len(dataset), CLASSIFIER_CHECK_IMAGES))])
    images = images.to(device)
    logits = model(images).float()
    own = embed(model, images).float() @ weight.T + bias
    tolerance = 1e-4 * max(1.0, float(logits.abs().max())) if logits.numel() else 1e-4
    if own.shape != logits.shape or not torch.allclose(own, logits, rtol=1e-4, atol=tolerance):
        say("classifier: not written (the linear layer on the stored embeddings does not give the network's logits)")
        return None
    return Classifier(
        weight=weight.cpu().numpy(), bias=bias.cpu().numpy(),
        loss=ft_config.loss, sampler=ft_config.sampler, trained=True,
        sampler_params=dict(ft_config.sampler_params), epochs=int(ft_config.epochs),
    )


def _write_features(
    config: ExtractConfig,
    manifest: Manifest,
    data_config: Dict[str, Any],
    embed_rows: Callable[..., None],
    *,
    dim: int,
    attrs: Dict[str, Any],
    dist: DistInfo,
    paths: Dict[str, Path],
    say: Callable[[str], None],
    classifier: Optional[Classifier] = None,
) -> None:
    """Embed every split (and the views) into the feature file, and the
    network's own ``classifier`` where there is one; rank 0 writes.

    A rerun replaces the previous run's feature file and manifest only once
    both new ones are complete: the features go to a temporary file the
    writer commits on exit, the manifest to one committed right after; a
    failure anywhere leaves the previous pair intact.
    """
    eval_transform, normalize = make_uint8_transform(data_config)
    writer_cm = (
        FeatureWriter(
            paths["out"], class_names=manifest.class_names, backbone=config.backbone, attrs=attrs,
            dtype=DTYPES[config.dtype],
        )
        if dist.is_main
        else contextlib.nullcontext()
    )
    staged_manifest: Optional[Path] = None
    try:
        with writer_cm as writer:
            _embed_splits(writer, manifest, eval_transform, functools.partial(embed_rows, normalize=normalize),
                          dim=dim, dist=dist, say=say)
            if config.views:
                train_transform = make_transform(data_config, is_training=True)
                _embed_views(writer, manifest.splits["train"], train_transform, embed_rows, config=config, dim=dim, dist=dist, say=say)
            if dist.is_main and manifest.reference_counts is not None:
                writer.write_reference_counts(manifest.reference_counts, source=manifest.reference_source)
            if classifier is not None:
                writer.write_classifier(classifier)
            if dist.is_main:  # complete before the feature file's commit, removed if that fails
                staged_manifest = save_manifest(manifest, paths["manifest"], staged=True)
        if staged_manifest is not None:
            commit(staged_manifest, paths["manifest"])
    except BaseException as exc:
        if staged_manifest is not None:
            staged_manifest.unlink(missing_ok=True)
        if isinstance(exc, OSError) and is_disk_full(exc):
            raise DecoupleError(
                f"{paths['out']}: no space left on device while writing features; "
                f"the temporary file was removed"
            ) from None
        raise


def _embed_splits(
    writer: Optional[FeatureWriter], manifest: Manifest, transform: Callable, embed_rows: Callable[..., None],
    *, dim: int, dist: DistInfo, say: Callable[[str], None],
) -> None:
    """/<split>/features, labels and fingerprints of every split, in manifest order."""
    for name, items in manifest.splits.items():
        if dist.is_main:
            writer.create_split(name, n=len(items), dim=dim)
            writer.create_fingerprints(name, n=len(items))

        def write(start: int, block: np.ndarray, name: str = name, items: SplitItems = items) -> None:
            writer.write_rows(name, start, block, items.labels[start : start + len(block)])

        def write_fingerprints(start: int, block: np.ndarray, name: str = name) -> None:
            writer.write_fingerprint_rows(name, start, block)

        embed_rows(items, transform, write=write, write_fingerprints=write_fingerprints)
        say(f"embedded {name}: {len(items)} x {dim}")


def _embed_views(
    writer: Optional[FeatureWriter], train: SplitItems, transform: Callable, embed_rows: Callable[..., None],
    *, config: ExtractConfig, dim: int, dist: DistInfo, say: Callable[[str], None],
) -> None:
    """/train/views (N, K, D): K embeddings of each training image under the training augmentation."""
    if dist.is_main:
        writer.create_views("train", n=len(train), views=config.views, dim=dim)
    for view in range(config.views):
        generator = seed_everything(config.split.seed, 2, view, dist.rank)

        def write_view(start: int, block: np.ndarray, view: int = view) -> None:
            writer.write_view_rows("train", view, start, block)

        embed_rows(train, transform, write=write_view, generator=generator)
    say(f"embedded train views: {len(train)} x {config.views} x {dim}")
