"""One way to add and look up named classes, shared by the distiller and codec registries."""

import pytest

from replaykit import codecs, distill, registry


class _Named:
    name = "thing"


def test_add_and_lookup_name_what_went_wrong():
    table: dict = {}
    assert registry.add(table, _Named, "widget") is _Named and registry.lookup(table, "thing", "widget") is _Named
    assert registry.add(table, _Named, "widget") is _Named  # the same class again is fine
    other = type("Other", (), {"name": "thing"})
    with pytest.raises(ValueError, match="a widget named 'thing' is already registered"):
        registry.add(table, other, "widget")
    with pytest.raises(ValueError, match="has no registry name"):
        registry.add(table, type("Nameless", (), {"name": ""}), "widget")
    with pytest.raises(ValueError, match="unknown widget 'nope'; available: thing"):
        registry.lookup(table, "nope", "widget")


def test_both_registries_use_it():
    with pytest.raises(ValueError, match="unknown distillation method 'nope'"):
        distill.make("nope")
    with pytest.raises(ValueError, match="unknown codec 'nope'"):
        codecs.make("nope")
