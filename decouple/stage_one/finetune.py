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
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from decouple.atomic import atomic_path
from decouple.stage_one.data import ImageDataset, Manifest
from decouple.errors import ConfigError, DecoupleError
from decouple.provenance import jsonable
from decouple.registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("lr schedule")

DISK_FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


# --------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    """Where this process runs: rank, world size, local rank, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def resolve_device(device: str = "auto", *, local_rank: int = 0) -> torch.device:
    """``auto`` is CUDA (this process's local GPU) when present, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible to this process")
        return torch.device("cuda", local_rank)
    if device == "cpu" or device.startswith("cuda:"):
        return torch.device(device)
    raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N; got {device!r}")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (or run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    resolved = resolve_device(device, local_rank=local_rank)
    info = DistInfo(rank, world_size, local_rank, local_world, resolved)
    if world_size > 1:
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        if not torch.distributed.is_initialized():
            backend = "nccl" if resolved.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)
            info.initialized_here = True
    return info


def shutdown_distributed(info: DistInfo) -> None:
    if info.initialized_here and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def broadcast_from_main(info: DistInfo, make: Callable[[], Any]) -> Any:
    """Run ``make`` on rank 0 and hand its result (or its DecoupleError) to every rank."""
    if not info.distributed:
        return make()
    payload: List[Any] = [None]
    if info.is_main:
        try:
            payload[0] = ("ok", make())
        except DecoupleError as exc:
            payload[0] = ("error", exc)
    torch.distributed.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise value
    return value


# --------------------------------------------------------------------------- optimizers and schedules


@OPTIMIZERS.register("sgd")
def sgd(params, *, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(params, *, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter, ICLR 2019); ``momentum`` is beta1."""
    return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)


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
    """Learning-rate factor at optimizer update ``step``: linear warmup, then the schedule."""
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

    def resolved(self) -> "FinetuneConfig":
        """A copy with optimizer defaults and the loss's linear-family settings
        filled in and names checked. timm's classifier is a linear layer, so
        the loss takes the settings the linear heads of stage two take
        (LDAM's s = 1; :func:`decouple.stage_two.losses.family_settings`)."""
        from decouple.stage_two.losses import family_settings

        OPTIMIZERS.check(self.optimizer, where="--optimizer")
        SCHEDULES.check(self.schedule, where="--schedule")
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


def default_workers(device: torch.device, local_world_size: int = 1) -> int:
    """Loader processes: none on the CPU (decoding competes with compute), else up to 8 per GPU."""
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // max(local_world_size, 1)))


# --------------------------------------------------------------------------- transforms


def make_transform(data_config: Dict[str, Any], *, is_training: bool) -> Callable:
    """timm's transforms at the configured input size; pad-and-crop for inputs
    of 64 pixels or less (the CIFAR recipe of He et al. 2016: 4-pixel padding
    at 32 px, random crop, horizontal flip)."""
    import torchvision.transforms as T
    from timm.data import create_transform

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


def data_config_for(model: nn.Module, img_size: int) -> Dict[str, Any]:
    """timm's data config (mean, std, interpolation, crop) at ``img_size``."""
    from timm.data import resolve_data_config

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


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


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
    from tqdm.auto import tqdm

    from decouple.stage_two.losses import create_loss
    from decouple.stage_two.samplers import DistributedClassSampler, create_sampler

    config = config.resolved()
    dist = dist or DistInfo()
    device = dist.device
    on_cuda = device.type == "cuda"
    fingerprint = dict(fingerprint or {})
    fingerprint.update(
        {key: value for key, value in asdict(config).items() if key not in ("workers", "progress")}
    )
    fingerprint = jsonable(fingerprint)
    train = manifest.splits["train"]
    counts = manifest.counts("train")

    sampler = create_sampler(config.sampler, train.labels, total_epochs=config.epochs, seed=config.seed, **config.sampler_params)
    loss_fn = create_loss(config.loss, class_counts=counts, **config.loss_params).to(device)
    if dist.distributed:
        sampler = DistributedClassSampler(sampler, num_replicas=dist.world_size, rank=dist.rank)
    workers = default_workers(device, dist.local_world_size) if config.workers is None else config.workers
    dataset = ImageDataset(train, make_transform(data_config, is_training=True))
    per_rank = len(sampler)
    steps_per_epoch_batches = per_rank // config.batch_size if per_rank >= config.batch_size else 1
    updates_per_epoch = math.ceil(steps_per_epoch_batches / config.accumulate)
    total_updates = updates_per_epoch * config.epochs
    warmup = min(int(round(config.warmup_epochs * updates_per_epoch)), total_updates // 2)

    model.to(device)
    if on_cuda and config.channels_last:
        model.to(memory_format=torch.channels_last)
    from timm.optim import param_groups_weight_decay

    params = param_groups_weight_decay(model, config.weight_decay)
    optimizer = OPTIMIZERS.get(config.optimizer)(
        params, lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
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
    start_epoch, history = 0, []
    if resume and checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint, fingerprint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        history = [EpochStats(**row) for row in state.get("history", [])]
        if dist.is_main:
            log(f"resumed from {checkpoint} after epoch {start_epoch}/{config.epochs}")
    elif resume and dist.is_main:
        log(f"no checkpoint at {checkpoint}; starting from epoch 1")

    train_model: nn.Module = model
    if dist.distributed:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if on_cuda else None)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if on_cuda and config.amp
        else contextlib.nullcontext
    )
    memory_format = torch.channels_last if on_cuda and config.channels_last else torch.contiguous_format

    for epoch in range(start_epoch, config.epochs):
        generator = seed_everything(config.seed, 1, epoch, dist.rank)
        sampler.set_epoch(epoch)
        loss_fn.set_epoch(epoch, config.epochs)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=config.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=on_cuda,
            drop_last=per_rank >= config.batch_size,
            generator=generator,
            persistent_workers=False,
        )
        train_model.train()
        bar = tqdm(
            total=len(loader),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not (dist.is_main and config.progress),
            leave=False,
            mininterval=0.5,
        )
        epoch_lr = float(optimizer.param_groups[0]["lr"])
        loss_sum = torch.zeros((), device=device)
        seen = 0
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        batches = len(loader)
        for index, (images, labels) in enumerate(loader):
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            group_end = (index + 1) % config.accumulate == 0 or index + 1 == batches
            group_start = index - index % config.accumulate
            group_size = min(config.accumulate, batches - group_start)
            sync = contextlib.nullcontext() if group_end or not dist.distributed else train_model.no_sync()
            with sync:
                with autocast():
                    logits = train_model(images)
                loss = loss_fn(logits.float(), labels)
                (loss / group_size).backward()
            if group_end:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
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
            raise ConfigError(
                f"--lr {config.lr:g}: training loss became {mean_loss} in epoch {epoch + 1}; lower --lr"
            )
        stats = EpochStats(
            epoch=epoch + 1,
            loss=mean_loss,
            images_per_second=seen * dist.world_size / max(elapsed, 1e-9),
            lr=epoch_lr,
            seconds=elapsed,
        )
        history.append(stats)
        if dist.is_main:
            log(
                f"epoch {stats.epoch}/{config.epochs}: loss {stats.loss:.4f}, "
                f"{stats.images_per_second:.0f} img/s, lr {stats.lr:.3g}"
            )
            if checkpoint is not None:
                save_checkpoint(
                    {
                        "epoch": epoch + 1,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "fingerprint": fingerprint,
                        "history": [asdict(row) for row in history],
                    },
                    checkpoint,
                )
        dist.barrier()
    if dist.distributed:
        # BatchNorm running statistics last moved with each rank's own batch;
        # every rank embeds with rank 0's so shards agree with the checkpoint.
        with torch.no_grad():
            for tensor in model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
    model.eval()
    return history
