"""Strict type checks shared by the configuration objects."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from replaykit.typed import canonical_json, check_type, checked_fields, method_parameters


@pytest.mark.parametrize("value, kind", [(True, bool), (False, bool), (3, int), (3, float), (2.5, float), ("x", str)])
def test_values_of_the_right_type_pass(value, kind):
    check_type("k", value, kind)


@pytest.mark.parametrize("value, kind", [("False", bool), (0, bool), (1, bool), (True, int), (2.0, int), (False, float), (3, str)])
def test_values_of_the_wrong_type_are_named(value, kind):
    with pytest.raises(ValueError, match=f"option k={value!r} must be {kind.__name__}"):
        check_type("k", value, kind)


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
