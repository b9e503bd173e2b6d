"""The open head contract: a trainable head registered from outside the
package trains in the fused trainer with no edit to it.

Two toy heads, registered here: one on a weight family of its own (a linear
classifier without bias), and one that is only a post-fit step on the
linear family's weights (post-hoc logit adjustment), which must share the
linear head's fused pass and weights.
"""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import decouple.stage_two.fit as fit_module
from decouple.stage_two.cells import Cell
from decouple.stage_two.config import TrainConfig
from decouple.stage_two.fit import fit_cells
from decouple.stage_two.heads import HEADS, LinearHead, TrainableHead, head_families
from decouple.stage_two.trainer import FEATURE_NORM, WeightFamily

TRAIN = TrainConfig(epochs=30, device="cpu", precision="float32")


class BiasFreeFamily(WeightFamily):
    """logits = x W^T, no bias: a family the trainer has never seen."""

    def parameters(self, num_heads, num_classes, dim, *, generator, device, train):
        initial = torch.randn(num_classes, dim, generator=generator).mul_(0.01 / FEATURE_NORM)
        weight = initial.repeat(num_heads, 1).to(device).requires_grad_(True)
        return {"weight": weight}, [{"params": [weight], "weight_decay": train.weight_decay}]

    def logits(self, x, params, dtype):
        return F.linear(x, params["weight"].to(dtype)).float()


class BiasFreeHead(TrainableHead):
    """Toy: a linear head without bias, on its own weight family and a logit
    family no loss knows (so every loss keeps its constructor settings)."""

    logit_family = "bias_free"

    def __init__(self) -> None:
        pass

    def weight_family(self, losses):
        return BiasFreeFamily()

    def finish(self, trained, data, *, seed, train):
        self._set_linear(trained.params["weight"].cpu().numpy(), None)


class PriorShiftHead(LinearHead):
    """Toy: the linear head's weights, logits shifted by -log prior after fitting."""

    def finish(self, trained, data, *, seed, train):
        super().finish(trained, data, seed=seed, train=train)
        self.intercept_ = self.intercept_ - np.log(data.class_counts / data.class_counts.sum()).astype(np.float32)


@pytest.fixture
def toy_heads(monkeypatch):
    """Register the toy heads for one test only."""
    monkeypatch.setattr(HEADS, "_entries", dict(HEADS._entries))
    monkeypatch.setattr(HEADS, "_descriptions", dict(HEADS._descriptions))
    HEADS.register("toy_bias_free")(BiasFreeHead)
    HEADS.register("toy_prior_shift")(PriorShiftHead)


@pytest.fixture
def fused_passes(monkeypatch):
    """The families of every fused pass fit_cells runs."""
    passes = []
    real = fit_module.train_heads

    def counting(data, losses, *, family, **kwargs):
        passes.append((type(family).__name__, len(losses)))
        return real(data, losses, family=family, **kwargs)

    monkeypatch.setattr(fit_module, "train_heads", counting)
    return passes


@pytest.mark.parametrize("toy_first", [False, True])
def test_a_head_with_its_own_family_trains_fused_beside_linear(gaussian_feature_set, toy_heads, fused_passes,
                                                                toy_first):
    toys = [Cell("toy_bias_free", "ce"), Cell("toy_bias_free", "balanced_softmax")]
    cells = toys + [Cell("linear", "ce")] if toy_first else [Cell("linear", "ce")] + toys
    results = [result for result in fit_cells(gaussian_feature_set, cells, train=TRAIN)
               if result.head == "toy_bias_free"]
    # Its own pass, whatever the order: it builds its own family, so it never joins linear's.
    assert sorted(fused_passes) == [("BiasFreeFamily", 2), ("LinearFamily", 1)]
    chance = 1.0 / gaussian_feature_set.num_classes
    for result in results:
        assert result.metrics["test"]["top1"] > 5 * chance
        assert result.params["selected_on"] == "val"
    # Fused with another loss, each toy head equals its own training alone
    # (to one test image: thread counts may differ between the two passes).
    one_image = 1.0 / results[0].metrics["test"]["n"]
    for cell, together in zip(toys, results):
        alone = fit_cells(gaussian_feature_set, [cell], train=TRAIN)[0]
        for metric in ("top1", "mean_class_acc", "few"):
            assert alone.metrics["test"][metric] == pytest.approx(together.metrics["test"][metric], abs=1.5 * one_image)


def test_a_post_fit_head_shares_the_linear_pass_and_weights(gaussian_feature_set, toy_heads, fused_passes):
    results = fit_cells(gaussian_feature_set, [Cell("linear", "ce"), Cell("toy_prior_shift", "ce")], train=TRAIN)
    assert fused_passes == [("LinearFamily", 1)]  # one pass, one weight for both heads
    assert "toy_prior_shift" in head_families()["linear"]
    linear, shifted = (result.metrics["test"] for result in results)
    # Dividing by the long-tailed prior moves predictions towards the tail.
    assert shifted["few"] >= linear["few"]
    assert shifted != linear


def test_the_toy_head_fits_alone_like_a_built_in_one(gaussian_feature_set, toy_heads):
    head = HEADS.create("toy_bias_free")
    train, val = gaussian_feature_set.splits["train"], gaussian_feature_set.splits["val"]
    head.fit(train.features, train.labels, X_val=val.features, y_val=val.labels, loss="focal",
             train=dataclasses.replace(TRAIN, epochs=10))
    test = gaussian_feature_set.splits["test"]
    assert head.coef_.shape == (gaussian_feature_set.num_classes, train.features.shape[1])
    assert np.mean(head.predict(test.features) == test.labels) > 5.0 / gaussian_feature_set.num_classes
