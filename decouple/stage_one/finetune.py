"""Stage one's fine-tune loop: a timm backbone trained with a long-tailed loss
and class sampler from the stage-two registries.

SGD or AdamW (a registry), linear warmup then cosine or step decay (a
registry, stepped per optimizer update), bf16 autocast and channels_last on
CUDA, gradient accumulation, a checkpoint after every epoch (``resume``
continues from it bit for bit on the CPU), a tqdm bar with loss and images/s.
Launched by ``torchrun`` (``WORLD_SIZE`` > 1) it trains with
DistributedDataParallel, NCCL on GPUs and gloo on the CPU, the sampler wrapped
in :class:`~decouple.stage_two.samplers.DistributedClassSampler`; ``batch_size`` is per
process.

Randomness (sampler, augmentation, dropout) is re-seeded from (seed, epoch,
rank) at the start of every epoch, so an interrupted run resumed from its
checkpoint follows the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import errno
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torchvision.transforms as T
from timm.data import create_transform, resolve_data_config
from timm.data.transforms import MaybeToTensor
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from tqdm.auto import tqdm

from decouple.atomic import atomic_path
from decouple.errors import ConfigError, DecoupleError
from decouple.provenance import jsonable
from decouple.registry import Registry
from decouple.stage_one.distributed import DistInfo, default_workers
from decouple.stage_one.image_cache import (
    BatchNormalize,
    DecodedImages,
    augmentation_for,
    cache_for,
    cache_side,
    check_cache_mode,
    epoch_generator,
    resolve_cache_mode,
)
from decouple.stage_one.images import ImageDataset
from decouple.stage_one.manifest import Manifest
from decouple.stage_two.losses import create_loss, family_settings
from decouple.stage_two.samplers import SAMPLERS, DistributedClassSampler, create_sampler

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("lr schedule")

DISK_FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


# --------------------------------------------------------------------------- optimizers and schedules


@OPTIMIZERS.register("sgd")
def sgd(params, *, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum."""
    name = "sgd" if momentum > 0 else "momentum"  # timm's "sgd" is Nesterov, which needs momentum
    return create_optimizer_v2(params, name, lr=lr, weight_decay=weight_decay, momentum=momentum)


@OPTIMIZERS.register("adamw")
def adamw(params, *, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter, ICLR 2019); ``momentum`` is beta1."""
    return create_optimizer_v2(params, "adamw", lr=lr, weight_decay=weight_decay, betas=(momentum, 0.999))


# Defaults that suit each optimizer when the user sets none.
OPTIMIZER_DEFAULTS = {"sgd": {"lr": 0.05, "weight_decay": 5e-4}, "adamw": {"lr": 1e-3, "weight_decay": 0.05}}


@SCHEDULES.register("cosine")
def cosine_schedule(progress: float, epoch: float, *, milestones: Sequence[int], decay: float) -> float:
    """Cosine decay to zero over the steps after warmup (Loshchilov & Hutter, ICLR 2017)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


@SCHEDULES.register("step")
def step_schedule(progress: float, epoch: float, *, milestones: Sequence[int], decay: float) -> float:
    """Multiply the rate by ``decay`` at each milestone epoch (He et al. 2016)."""
    return decay ** sum(1 for milestone in milestones if epoch >= milestone)


def lr_multiplier(
    step: int,
    *,
    schedule: str,
    total_steps: int,
    warmup_steps: int,
    steps_per_epoch: int,
    milestones: Sequence[int],
    decay: float,
) -> float:
    """Learning-rate factor at optimizer update ``step``: linear warmup, then the schedule.

    Kept by hand: timm's and torch's warmup and cosine schedulers round the
    rate differently in the last bits, so runs and resumed checkpoints would
    no longer match earlier ones."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    epoch = step / max(steps_per_epoch, 1)
    return SCHEDULES.get(schedule)(progress, epoch, milestones=milestones, decay=decay)


# --------------------------------------------------------------------------- config


@dataclass
class FinetuneConfig:
    """Options of the fine-tune loop (all JSON-serialisable)."""

    epochs: int = 10
    batch_size: int = 128
    lr: Optional[float] = None
    optimizer: str = "sgd"
    weight_decay: Optional[float] = None
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    lr_steps: Tuple[int, ...] = ()
    lr_decay: float = 0.1
    accumulate: int = 1
    amp: bool = True
    channels_last: bool = True
    loss: str = "ce"
    loss_params: Dict[str, Any] = field(default_factory=dict)
    sampler: str = "instance"
    sampler_params: Dict[str, Any] = field(default_factory=dict)
    workers: Optional[int] = None
    seed: int = 0
    progress: bool = True
    #: Decoded training images kept once: "off" (the default until a
    #: comparison over several stage-one seeds shows the cache trains as well
    #: as the per-image pipeline; docs/benchmarks.md), "auto" (for inputs of
    #: 64 px or less: RAM when they fit in a quarter of it, else disk),
    #: "memory", "disk" or "device" (:mod:`decouple.stage_one.image_cache`);
    #: the augmentation then runs on batches.
    cache_images: str = "off"

    def resolved(self) -> "FinetuneConfig":
        """A copy with optimizer defaults and the loss's linear-family settings
        filled in and names checked. timm's classifier is a linear layer, so
        the loss takes the settings the linear heads of stage two take
        (LDAM's s = 1; :func:`decouple.stage_two.losses.family_settings`)."""
        OPTIMIZERS.check(self.optimizer, where="--optimizer")
        if self.sampler in SAMPLERS and SAMPLERS.get(self.sampler).synthesizes_features:
            usable = [name for name in SAMPLERS if not SAMPLERS.get(name).synthesizes_features]
            raise ConfigError(
                f"--sampler {self.sampler} is a stage-two sampler: it synthesises feature rows, which "
                f"stage one's image loader cannot draw; fine-tune with one of {', '.join(usable)}"
            )
        SCHEDULES.check(self.schedule, where="--schedule")
        check_cache_mode(self.cache_images)
        defaults = OPTIMIZER_DEFAULTS[self.optimizer]
        if self.epochs < 0:
            raise ConfigError(f"--epochs must be >= 0; got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1; got {self.batch_size}")
        if self.accumulate < 1:
            raise ConfigError(f"--accumulate must be >= 1; got {self.accumulate}")
        values = asdict(self)
        values["lr"] = defaults["lr"] if self.lr is None else self.lr
        values["weight_decay"] = defaults["weight_decay"] if self.weight_decay is None else self.weight_decay
        values["loss_params"] = family_settings(self.loss, "linear", self.loss_params)
        if not self.lr_steps and self.schedule == "step":
            # the CIFAR-LT recipe of Cao et al. 2019: decay at 160 and 180 of 200 epochs
            values["lr_steps"] = (int(self.epochs * 0.8), int(self.epochs * 0.9))
        values["lr_steps"] = tuple(int(s) for s in values["lr_steps"])
        return FinetuneConfig(**values)


# --------------------------------------------------------------------------- transforms


#: The tensor steps of an evaluation transform, which make_uint8_transform moves to the batch.
_TENSOR_STEPS = (T.ToTensor, T.Normalize, MaybeToTensor)


def make_transform(data_config: Dict[str, Any], *, is_training: bool) -> Callable:
    """timm's transforms at the configured input size; pad-and-crop for inputs
    of 64 pixels or less (the CIFAR recipe of He et al. 2016: 4-pixel padding
    at 32 px, random crop, horizontal flip)."""
    size = int(data_config["input_size"][-1])
    if size <= 64:
        normalize = [T.ToTensor(), T.Normalize(data_config["mean"], data_config["std"])]
        resize = [T.Resize((size, size))]
        if is_training:
            return T.Compose(resize + [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()] + normalize)
        return T.Compose(resize + normalize)
    return create_transform(
        input_size=data_config["input_size"],
        is_training=is_training,
        interpolation=data_config.get("interpolation", "bilinear"),
        mean=data_config["mean"],
        std=data_config["std"],
        crop_pct=data_config.get("crop_pct"),
        crop_mode=data_config.get("crop_mode"),
    )


def make_uint8_transform(data_config: Dict[str, Any]) -> Tuple[Callable, BatchNormalize]:
    """The evaluation transform of :func:`make_transform` split in two: per
    image, the PIL resize and crop to a uint8 tensor (3, H, W); per batch,
    :class:`BatchNormalize` (to float, / 255, minus mean, over std) on the
    batch's device. Decoding workers then hand over a quarter of the bytes,
    and the many small per-image tensor ops become one batch op; the floats
    are the very same as ToTensor then Normalize computes per image."""
    full = make_transform(data_config, is_training=False)
    pil_steps = [step for step in full.transforms if not isinstance(step, _TENSOR_STEPS)]
    return T.Compose(pil_steps + [T.PILToTensor()]), BatchNormalize(data_config["mean"], data_config["std"])


def data_config_for(model: nn.Module, img_size: int) -> Dict[str, Any]:
    """timm's data config (mean, std, interpolation, crop) at ``img_size``."""
    config = resolve_data_config({}, model=model)
    config["input_size"] = (3, int(img_size), int(img_size))
    if img_size <= 64:
        config["crop_pct"] = 1.0
    return config


# --------------------------------------------------------------------------- seeding


def seed_everything(seed: int, *purpose: int) -> torch.Generator:
    """Seed torch, numpy and random from (seed, *purpose); a generator for loaders."""
    state = int(np.random.SeedSequence([seed, *purpose]).generate_state(1, dtype=np.uint64)[0] % (2**63))
    torch.manual_seed(state)
    random.seed(state)
    np.random.seed(state % (2**32))
    generator = torch.Generator()
    generator.manual_seed(state)
    return generator


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    """Write atomically; a full disk removes the temporary file and says so."""
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except OSError as exc:
        if is_disk_full(exc):
            raise DecoupleError(f"{path}: no space left on device writing the checkpoint; nothing written") from None
        raise


def is_disk_full(exc: BaseException) -> bool:
    """True for 'no space left' / quota errors, however the library wrapped them."""
    text = str(exc)
    return getattr(exc, "errno", None) in DISK_FULL_ERRNOS or "No space left" in text or "errno = 28" in text


def load_checkpoint(path: Path, fingerprint: Dict[str, Any]) -> Dict[str, Any]:
    """A checkpoint of this very run (``fingerprint`` must match), else DecoupleError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DecoupleError(f"{path}: checkpoint cannot be read ({type(exc).__name__}); delete it or drop --resume") from None
    saved = state.get("fingerprint", {}) if isinstance(state, dict) else {}
    for key, value in fingerprint.items():
        if saved.get(key) != value:
            raise DecoupleError(
                f"{path}: checkpoint was made with {key}={saved.get(key)!r}, this run has {value!r}; "
                f"drop --resume to start over or pass the original options"
            )
    return state


# --------------------------------------------------------------------------- the loop


@dataclass
class EpochStats:
    epoch: int
    loss: float
    images_per_second: float
    lr: float
    seconds: float
    #: Seconds spent decoding the training images into the cache before this
    #: epoch (the first a process runs), outside ``seconds``.
    cache_seconds: float = 0.0


def run_fingerprint(config: FinetuneConfig, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What a checkpoint must share with this run to be resumed: ``extra`` and
    every option that changes the trajectory."""
    fingerprint = dict(extra or {})
    # The image cache changes the augmentation's draws, not the recipe: a run may resume with another mode.
    fingerprint.update({key: value for key, value in asdict(config).items()
                        if key not in ("workers", "progress", "cache_images")})
    return jsonable(fingerprint)


def build_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    """The configured optimizer; no weight decay on biases and norm weights (timm's
    parameter groups, without the model's own ``no_weight_decay`` list, as before)."""
    params = param_groups_weight_decay(model, config.weight_decay)
    return OPTIMIZERS.get(config.optimizer)(
        params, lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: FinetuneConfig, *, updates_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup (capped at half the run) then the schedule, stepped per optimizer update."""
    total_updates = updates_per_epoch * config.epochs
    warmup = min(int(round(config.warmup_epochs * updates_per_epoch)), total_updates // 2)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(
            step,
            schedule=config.schedule,
            total_steps=total_updates,
            warmup_steps=warmup,
            steps_per_epoch=updates_per_epoch,
            milestones=config.lr_steps,
            decay=config.lr_decay,
        ),
    )


@dataclass
class _Loop:
    """What one fine-tune run trains with."""

    config: FinetuneConfig
    dist: DistInfo
    model: nn.Module  # the bare model, whose state the checkpoint holds
    train_model: nn.Module  # the model, DDP-wrapped when distributed
    dataset: ImageDataset
    sampler: Any
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    workers: int
    fingerprint: Dict[str, Any]
    #: With --cache-images: the decoded training images and their batch augmentation.
    cache: Optional[DecodedImages] = None
    augment: Optional[Callable[..., torch.Tensor]] = None
    #: Seconds it took to fill ``cache`` (decoding, or reading a disk cache back).
    cache_seconds: float = 0.0

    @property
    def on_cuda(self) -> bool:
        return self.dist.device.type == "cuda"

    @property
    def per_rank(self) -> int:
        return len(self.sampler)

    def autocast(self):
        """bf16 autocast on CUDA when ``amp``; else nothing."""
        if self.on_cuda and self.config.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.on_cuda and self.config.channels_last else torch.contiguous_format


def _build_loop(
    model: nn.Module, manifest: Manifest, config: FinetuneConfig, data_config: Dict[str, Any],
    dist: DistInfo, fingerprint: Dict[str, Any], *, checkpoint: Optional[Path] = None,
    log: Callable[[str], None] = print,
) -> _Loop:
    """Sampler, loss, data, optimizer and schedule for ``model`` on ``manifest``'s train split."""
    device = dist.device
    train = manifest.splits["train"]
    sampler = create_sampler(config.sampler, train.labels, total_epochs=config.epochs, seed=config.seed, **config.sampler_params)
    loss_fn = create_loss(config.loss, class_counts=manifest.counts("train"), **config.loss_params).to(device)
    if dist.distributed:
        sampler = DistributedClassSampler(sampler, num_replicas=dist.world_size, rank=dist.rank)
    workers = default_workers(device, dist.local_world_size) if config.workers is None else config.workers
    dataset = ImageDataset(train, make_transform(data_config, is_training=True))
    side = cache_side(data_config)
    mode = resolve_cache_mode(config.cache_images, len(train.labels), side,
                              input_side=int(data_config["input_size"][-1]), processes_per_node=dist.local_world_size)
    disk_folder = None if checkpoint is None else checkpoint.parent
    if mode == "disk" and disk_folder is None and config.cache_images == "auto":
        mode = "off"  # too large for RAM and nowhere to keep a file: decode every epoch, as before
    waits = mode == "disk" and dist.distributed  # rank 0 writes the file, the others then read it
    cache_started = time.perf_counter()
    if waits and not dist.is_main:
        dist.barrier()
    try:
        cache = cache_for(mode, train, side, device=device, workers=workers,
                          progress=config.progress and dist.is_main, disk_folder=disk_folder,
                          log=log if dist.is_main else (lambda message: None))
    finally:
        if waits and dist.is_main:
            dist.barrier()  # also when it failed, so the others do not wait forever
    augment = augmentation_for(data_config) if cache is not None else None
    batches_per_epoch = len(sampler) // config.batch_size if len(sampler) >= config.batch_size else 1
    model.to(device)
    if device.type == "cuda" and config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, updates_per_epoch=math.ceil(batches_per_epoch / config.accumulate))
    return _Loop(config, dist, model, model, dataset, sampler, loss_fn, optimizer, scheduler, workers, fingerprint,
                 cache=cache, augment=augment, cache_seconds=time.perf_counter() - cache_started)


def _resume(loop: _Loop, checkpoint: Optional[Path], resume: bool, log: Callable[[str], None]) -> Tuple[int, List[EpochStats]]:
    """(first epoch to run, history so far): from the checkpoint when resuming and there is one."""
    if resume and checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint, loop.fingerprint)
        loop.model.load_state_dict(state["model"])
        loop.optimizer.load_state_dict(state["optimizer"])
        loop.scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        if loop.dist.is_main:
            log(f"resumed from {checkpoint} after epoch {start_epoch}/{loop.config.epochs}")
        return start_epoch, [EpochStats(**row) for row in state.get("history", [])]
    if resume and loop.dist.is_main:
        log(f"no checkpoint at {checkpoint}; starting from epoch 1")
    return 0, []


class _CachedEpoch:
    """One epoch's batches from the decoded-image cache: the sampler's indices
    in batches as the DataLoader would cut them, each batch augmented on the
    cache's device with the epoch's own generator."""

    def __init__(self, loop: _Loop, epoch: int) -> None:
        self.loop, self.indices = loop, list(loop.sampler)
        self.drop_last = loop.per_rank >= loop.config.batch_size
        self.generator = epoch_generator(loop.dist.device, loop.config.seed, epoch, loop.dist.rank)

    def __len__(self) -> int:
        size = self.loop.config.batch_size
        return len(self.indices) // size if self.drop_last else -(-len(self.indices) // size)

    def __iter__(self):
        device = self.loop.dist.device
        for images, sizes, labels in self.loop.cache.batches(self.indices, self.loop.config.batch_size,
                                                             drop_last=self.drop_last):
            # uint8 travels (a quarter of the float bytes); the augmentation runs on the training device.
            yield self.loop.augment(images.to(device, non_blocking=True), sizes.to(device), self.generator), labels


def _epoch_loader(loop: _Loop, epoch: int):
    """This epoch's loader (a DataLoader, or the cache's batches); sampler, loss
    and every random generator re-seeded from (seed, epoch, rank)."""
    config = loop.config
    generator = seed_everything(config.seed, 1, epoch, loop.dist.rank)
    loop.sampler.set_epoch(epoch)
    loop.loss_fn.set_epoch(epoch, config.epochs)
    if loop.cache is not None:
        return _CachedEpoch(loop, epoch)
    return torch.utils.data.DataLoader(
        loop.dataset,
        batch_size=config.batch_size,
        sampler=loop.sampler,
        num_workers=loop.workers,
        pin_memory=loop.on_cuda,
        drop_last=loop.per_rank >= config.batch_size,
        generator=generator,
        persistent_workers=False,
    )


def _train_batch(loop: _Loop, images: torch.Tensor, labels: torch.Tensor, *, index: int, batches: int) -> torch.Tensor:
    """Forward and backward of batch ``index``; an optimizer update (and a
    gradient all-reduce) at the end of each group of ``accumulate`` batches."""
    accumulate = loop.config.accumulate
    images = images.to(loop.dist.device, non_blocking=True, memory_format=loop.memory_format)
    labels = labels.to(loop.dist.device, non_blocking=True)
    group_end = (index + 1) % accumulate == 0 or index + 1 == batches
    group_size = min(accumulate, batches - (index - index % accumulate))
    sync = contextlib.nullcontext() if group_end or not loop.dist.distributed else loop.train_model.no_sync()
    with sync:
        with loop.autocast():
            logits = loop.train_model(images)
        loss = loop.loss_fn(logits.float(), labels)
        (loss / group_size).backward()
    if group_end:
        loop.optimizer.step()
        loop.optimizer.zero_grad(set_to_none=True)
        loop.scheduler.step()
    return loss


def _train_epoch(loop: _Loop, epoch: int) -> EpochStats:
    """One pass over the sampler, an optimizer update every ``accumulate`` batches."""
    config, dist = loop.config, loop.dist
    device = dist.device
    loader = _epoch_loader(loop, epoch)
    loop.train_model.train()
    bar = tqdm(
        total=len(loader),
        desc=f"epoch {epoch + 1}/{config.epochs}",
        disable=not (dist.is_main and config.progress),
        leave=False,
        mininterval=0.5,
    )
    epoch_lr = float(loop.optimizer.param_groups[0]["lr"])
    loss_sum = torch.zeros((), device=device)
    seen = 0
    started = time.perf_counter()
    loop.optimizer.zero_grad(set_to_none=True)
    batches = len(loader)
    for index, (images, labels) in enumerate(loader):
        loss = _train_batch(loop, images, labels, index=index, batches=batches)
        loss_sum += loss.detach() * len(labels)
        seen += len(labels)
        if bar.disable is False and (index % 10 == 0 or index + 1 == batches):
            elapsed = time.perf_counter() - started
            bar.set_postfix(
                loss=f"{loss_sum.item() / seen:.4f}",
                img_s=f"{seen * dist.world_size / max(elapsed, 1e-9):.0f}",
                refresh=False,
            )
        bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - started
    mean_loss = float(loss_sum.item() / max(seen, 1))
    if not math.isfinite(mean_loss):
        raise ConfigError(f"--lr {config.lr:g}: training loss became {mean_loss} in epoch {epoch + 1}; lower --lr")
    return EpochStats(
        epoch=epoch + 1,
        loss=mean_loss,
        images_per_second=seen * dist.world_size / max(elapsed, 1e-9),
        lr=epoch_lr,
        seconds=elapsed,
    )


def _report_epoch(loop: _Loop, history: List[EpochStats], checkpoint: Optional[Path], log: Callable[[str], None]) -> None:
    """Log the epoch and save the checkpoint (rank 0); every rank waits for it."""
    stats = history[-1]
    if loop.dist.is_main:
        log(
            f"epoch {stats.epoch}/{loop.config.epochs}: loss {stats.loss:.4f}, "
            f"{stats.images_per_second:.0f} img/s, lr {stats.lr:.3g}"
            + (f" (and {stats.cache_seconds:.1f} s decoding the training images once)" if stats.cache_seconds else "")
        )
        if checkpoint is not None:
            save_checkpoint(
                {
                    "epoch": stats.epoch,
                    "model": loop.model.state_dict(),
                    "optimizer": loop.optimizer.state_dict(),
                    "scheduler": loop.scheduler.state_dict(),
                    "fingerprint": loop.fingerprint,
                    "history": [asdict(row) for row in history],
                },
                checkpoint,
            )
    loop.dist.barrier()


def finetune(
    model: nn.Module,
    manifest: Manifest,
    config: FinetuneConfig,
    *,
    data_config: Dict[str, Any],
    dist: Optional[DistInfo] = None,
    checkpoint: Optional[Path] = None,
    resume: bool = False,
    fingerprint: Optional[Dict[str, Any]] = None,
    log: Callable[[str], None] = print,
) -> List[EpochStats]:
    """Fine-tune ``model`` in place on ``manifest``'s train split; returns per-epoch stats.

    The model ends on ``dist.device`` in eval mode, unwrapped from DDP.
    """
    config = config.resolved()
    dist = dist or DistInfo()
    loop = _build_loop(model, manifest, config, data_config, dist, run_fingerprint(config, fingerprint),
                       checkpoint=checkpoint, log=log)
    start_epoch, history = _resume(loop, checkpoint, resume, log)
    if dist.distributed:
        device_ids = [dist.device.index] if loop.on_cuda else None
        loop.train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    for epoch in range(start_epoch, config.epochs):
        history.append(_train_epoch(loop, epoch))
        if epoch == start_epoch and loop.cache is not None:
            history[-1].cache_seconds = loop.cache_seconds
        _report_epoch(loop, history, checkpoint, log)
    if dist.distributed:
        # BatchNorm running statistics last moved with each rank's own batch;
        # every rank embeds with rank 0's so shards agree with the checkpoint.
        with torch.no_grad():
            for tensor in model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
    model.eval()
    return history
