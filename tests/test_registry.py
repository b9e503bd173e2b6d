"""The registry: decorator registration, helpful unknown-name errors."""

import pytest

from decouple.errors import ConfigError, UnknownNameError
from decouple.profiles import exponential_counts
from decouple.registry import Registry


def make_registry():
    registry = Registry("widget")

    @registry.register("round")
    class Round:
        """A round widget.

        More text.
        """

        def __init__(self, radius: float = 1.0):
            self.radius = radius

    return registry


def test_register_create_and_describe():
    registry = make_registry()
    assert registry.names() == ["round"]
    assert registry.describe() == [("round", "A round widget.")]
    assert registry.create("round", radius=2.0).radius == 2.0


def test_unknown_name_lists_known_and_suggests():
    registry = make_registry()
    with pytest.raises(UnknownNameError, match=r"unknown widget 'rund' \(did you mean 'round'\?\); known widgets: round"):
        registry.create("rund")


def test_unknown_parameter_is_named():
    with pytest.raises(ConfigError, match="takes no parameter 'diameter'; it takes: radius"):
        make_registry().create("round", diameter=3)


def test_duplicate_registration_fails():
    registry = make_registry()
    with pytest.raises(KeyError):
        registry.register("round")(object)


def test_exponential_profile_matches_cifar10_lt():
    counts = exponential_counts(5000, 10, 100)
    assert counts.sum() == 12406
    assert counts[0] == 5000 and counts[-1] == 50
    assert exponential_counts(500, 100, 100).sum() == 10847


def test_did_you_mean_names_the_closest_entries_or_nothing():
    from decouple.errors import did_you_mean

    assert did_you_mean("focall", ["ce", "focal", "ldam"]) == " (did you mean 'focal'?)"
    assert did_you_mean("resnet_50", ["resnet50", "resnet101", "vit"], n=2) == " (did you mean 'resnet50' or 'resnet101'?)"
    assert did_you_mean("zzz", ["ce", "focal"]) == ""
