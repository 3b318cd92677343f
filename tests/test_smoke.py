"""A first pass over the public surface with real worker processes."""

from __future__ import annotations

import parstream


def test_async_await_roundtrip(sup: parstream.Supervisor) -> None:
    """A task's value comes back through await_."""
    assert sup.async_(pow, 2, 10).await_() == 1024


def test_map_keeps_input_order() -> None:
    """parstream.map yields values in input order on the default supervisor."""
    assert list(parstream.map(abs, range(-50, 50))) == [abs(x) for x in range(-50, 50)]


def test_public_names_live_in_parstream() -> None:
    """Every exported name is reachable and says it belongs to parstream."""
    for name in parstream.__all__:
        obj = getattr(parstream, name)
        module = getattr(obj, "__module__", "parstream")
        assert module is None or not module.startswith("parstream._"), name
