"""Strict type checks shared by the configuration objects."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from replaykit.codecs import BufferFormatError
from replaykit.typed import canonical_json, check_positive_int, check_type, checked_fields, method_parameters


@pytest.mark.parametrize("value, kind", [(True, bool), (False, bool), (3, int), (3, float), (2.5, float), ("x", str)])
def test_values_of_the_right_type_pass(value, kind):
    check_type("k", value, kind)


@pytest.mark.parametrize("value, kind", [("False", bool), (0, bool), (1, bool), (True, int), (2.0, int), (False, float), (3, str)])
def test_values_of_the_wrong_type_are_named(value, kind):
    with pytest.raises(ValueError, match=f"option k={value!r} must be {kind.__name__}"):
        check_type("k", value, kind)


@pytest.mark.parametrize("value", [0, -3, True, 2.0, "4", None])
def test_only_ints_from_one_up_are_positive_ints(value):
    with pytest.raises(ValueError, match=f"factor must be a positive int, got {value!r}"):
        check_positive_int("factor", value)


def test_positive_int_passes_and_raises_the_error_asked_for():
    check_positive_int("factor", 1)
    check_positive_int("workers", None, allow_none=True)
    with pytest.raises(BufferFormatError, match="num_classes must be a positive int, got 0"):
        check_positive_int("num_classes", 0, BufferFormatError)
    with pytest.raises(ValueError, match="or None, got False"):
        check_positive_int("workers", False, allow_none=True)


def test_a_bool_is_not_a_downsampling_factor():
    """``True == 1`` once passed as a factor of the compressed buffer and the mixed-resolution view."""
    from replaykit.avalanche import MixedResolutionPlugin
    from replaykit.compressed import CompressedReplayBuffer
    from replaykit.data import dataset_info

    with pytest.raises(ValueError, match="factor must be a positive int, got True"):
        MixedResolutionPlugin(factor=True)
    with pytest.raises(ValueError, match="factor must be a positive int, got True"):
        CompressedReplayBuffer(mem_bytes=1000, codec="downsample", factor=True, dataset_meta=dataset_info("mnist").meta())


def test_canonical_json_and_checked_fields():
    @dataclass
    class Point:
        y: int = 0
        x: int = 0

    assert canonical_json(Point(1, 2)) == '{"x":2,"y":1}'
    assert checked_fields(Point, {"x": 1}) == {"x": 1}
    with pytest.raises(ValueError, match=r"unknown Point fields \['z'\]"):
        checked_fields(Point, {"x": 1, "z": 0})


def test_method_parameters_follow_the_constructor():
    params = method_parameters("dm")
    assert params["iterations"] is int and "ipc" not in params and "seed" not in params
    assert method_parameters("random") == {"factor": int, "bits": int, "device": str}
    with pytest.raises(ValueError, match="unknown distillation method 'dn'"):
        method_parameters("dn")
