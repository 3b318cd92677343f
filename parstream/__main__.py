"""``python -m parstream``: command-line tools.

``python -m parstream compare package.module:fn package.module:make_items``
imports both targets, calls ``make_items()`` for the iterable, runs
``parstream.compare`` and prints its table and advice (``--json PATH`` also
writes the record). A bad target (no such module or attribute, not callable,
a module that exits when imported, ``make_items`` failing, not returning an
iterable, or returning an iterator that fails as it is read) or an unusable
``--json`` path is one line on stderr and exit status 2, never a traceback;
Ctrl-C is one line and status 130.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import sys
from pathlib import Path
from typing import Any


class _BadTarget(Exception):
    """A target or option the command cannot use; the message is the whole report."""


def _load(target: str, what: str) -> Any:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise _BadTarget(f"{what} must look like package.module:name, got {target!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except SystemExit as exc:  # a script's main() run at import: nothing to compare
        raise _BadTarget(
            f"{what}: importing {module_name!r} called sys.exit({exc.code!r}); a module "
            "whose import runs a script cannot be compared (guard it with "
            "if __name__ == '__main__')"
        ) from None
    except Exception as exc:
        raise _BadTarget(
            f"{what}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise _BadTarget(f"{what}: {module_name!r} has no attribute {attr!r}") from exc
    if not callable(obj):
        raise _BadTarget(f"{what}: {target} is not callable (got {type(obj).__name__})")
    return obj


def _check_json_path(path: Path) -> None:
    """``--json``, checked before the run: a comparison runs for seconds
    before writing it, and a record it cannot write would be lost."""
    if not path.name or path.is_dir():
        raise _BadTarget(f"--json: {path} is a directory; give a file path")
    if not path.parent.is_dir():
        raise _BadTarget(f"--json: {path.parent} is not a directory")
    try:
        if path.exists():
            with path.open("a"):
                pass
        else:  # made and removed: what cannot be created is found now
            with path.open("x"):
                pass
            path.unlink()
    except OSError as exc:
        raise _BadTarget(f"--json: {path} cannot be written: {exc.strerror}") from None


def _items_of(make_items: Any, target: str, sample: int | None) -> Any:
    """``make_items()``'s iterable; an iterator is read here (its first
    ``sample`` items, or all), so that an input failing as it is read is
    reported as ``make_items``'s fault, not as a traceback."""
    from parstream._validate import check_iterable

    try:
        items = make_items()
    except Exception as exc:
        raise _BadTarget(f"make_items: {target}() raised {type(exc).__name__}: {exc}") from exc
    try:
        check_iterable(items, "make_items")
    except TypeError:
        raise _BadTarget(
            f"make_items: {target}() returned {type(items).__name__}, not an iterable"
        ) from None
    if iter(items) is not items:
        return items  # a collection: compare reads it (and knows its length)
    try:
        return list(items if sample is None else itertools.islice(items, sample))
    except Exception as exc:
        raise _BadTarget(
            f"make_items: reading the items of {target}() raised {type(exc).__name__}: {exc}"
        ) from exc


def _compare(args: argparse.Namespace) -> int:
    from parstream._compare import _EmptyInput, compare

    try:
        if args.json is not None:
            _check_json_path(args.json)
        fn = _load(args.fn, "fn")
        make_items = _load(args.make_items, "make_items")
        items = _items_of(make_items, args.make_items, args.sample)
        result = compare(
            fn,
            items,
            sample=args.sample,
            max_concurrency=args.max_concurrency,
            progress=not args.no_progress,
        )
    except (_BadTarget, _EmptyInput) as exc:
        print(f"python -m parstream compare: {exc}", file=sys.stderr)
        return 2
    print(result)
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        except OSError as exc:
            print(f"python -m parstream compare: --json: {exc}", file=sys.stderr)
            return 1
        print(f"record: {args.json}")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    if value > sys.maxsize:
        raise argparse.ArgumentTypeError(f"must be <= {sys.maxsize}, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parstream", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    cmp = commands.add_parser(
        "compare",
        help="will parallel pay? time fn sequentially and with parstream.map",
        description="Time fn over make_items() sequentially and with parstream.map, "
        "and print the table and advice.",
    )
    cmp.add_argument("fn", help="package.module:fn, the loop body")
    cmp.add_argument("make_items", help="package.module:make_items, returns the iterable")
    cmp.add_argument("--sample", type=_positive, help="judge only the first N items")
    cmp.add_argument("--max-concurrency", type=_positive, help="workers (default: one per core)")
    cmp.add_argument("--json", type=Path, metavar="PATH", help="also write the record as JSON")
    cmp.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    if args.command == "compare":
        try:
            return _compare(args)
        except KeyboardInterrupt:
            # Ctrl-C is the user's own doing: no traceback, the shell's status.
            print("python -m parstream compare: interrupted", file=sys.stderr)
            return 130
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
