"""Progress bars for streams: tqdm, chosen for where the code runs.

In a Jupyter kernel with ipywidgets the bar is tqdm's widget; anywhere else
it is tqdm's text bar on stderr (refreshed at most twice a second, so a saved
notebook or a CI log does not fill up). A widget's saved output is frozen at
its first frame, so on close a kernel also gets one final text line.
"""

from __future__ import annotations

import sys
from typing import Any


def _in_kernel() -> bool:
    return "ipykernel" in sys.modules and "ipykernel.zmqshell" in sys.modules


def _bar_class() -> Any:
    if _in_kernel():
        try:
            import ipywidgets  # noqa: F401
            from tqdm.notebook import tqdm as notebook_tqdm

            return notebook_tqdm
        except ImportError:
            pass
    from tqdm.std import tqdm as text_tqdm

    return text_tqdm


class Progress:
    """Wraps a tqdm bar: ``progress=True``, a dict of tqdm options, or a tqdm instance."""

    def __init__(self, spec: Any, *, total: int | None) -> None:
        self._own = True
        self._widget = False
        if spec is True or isinstance(spec, dict):
            options: dict[str, Any] = {"total": total, "unit": "item"}
            cls = _bar_class()
            self._widget = cls.__module__.startswith("tqdm.notebook")
            if not self._widget:
                options["mininterval"] = 0.5
            options.update(spec if isinstance(spec, dict) else {})
            if not self._widget:
                # The widget's own option: code written for a notebook runs
                # as a script too, where the bar is text.
                options.pop("display", None)
            self.bar = cls(**options)
        else:
            self._own = False
            self.bar = spec
            if getattr(spec, "total", None) is None and total is not None:
                spec.total = total
                spec.refresh()

    def update(self, n: int) -> None:
        self.bar.update(n)

    def finish(self) -> None:
        self.bar.refresh()

    def close(self) -> None:
        if not self._own:
            self.bar.refresh()
            return
        self.bar.close()
        if self._widget:
            # The widget's saved text/plain form shows 0%; leave the final state.
            print(str(self.bar), file=sys.stderr)
