"""Progress that suits where it goes: a tqdm bar on a terminal; in a piped or redirected log a plain line now and
then, since tqdm's carriage-return frames would fill the log with hundreds of partial lines."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm


class Progress:
    """``update`` / ``close`` of a bar over ``total`` units, started at ``initial``; off when not ``enabled``."""

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "step",
                 interval: float = 30.0, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.count, self.postfix = initial, ""
        self.started = self.last_line = time.monotonic()
        self.bar = None
        self.lines = enabled and not self.stream.isatty()
        if enabled and not self.lines:
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.count += n
        self.postfix = ", ".join(f"{key} {value}" for key, value in postfix.items())
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix)
        elif self.lines and time.monotonic() - self.last_line >= self.interval:
            self._line()

    def _line(self) -> None:
        self.last_line = time.monotonic()
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.count}/{self.total} {self.unit}s{extra} "
              f"({self.last_line - self.started:.0f} s)", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.lines:
            self._line()
        self.bar, self.lines = None, False
