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


def test_the_three_name_lists_agree() -> None:
    """``__all__``, the lazy-import table and the TYPE_CHECKING imports name the same set."""
    import ast
    from pathlib import Path

    source = Path(parstream.__file__).read_text()
    tree = ast.parse(source)
    typed: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for stmt in node.body:
                if isinstance(stmt, ast.ImportFrom):
                    typed.update(alias.asname or alias.name for alias in stmt.names)
    homes = set(parstream._HOMES)
    assert set(parstream.__all__) == homes == typed
    assert len(parstream.__all__) == len(set(parstream.__all__))
