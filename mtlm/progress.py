"""Progress for long work (training, evaluation): a tqdm bar on a terminal, periodic plain lines in a log.

A redirected stderr (a CI log, `nohup`, `2> train.log`) gets one line every `every_percent` of the total or
every `every_s` seconds, whichever comes first, plus the last one, instead of tqdm's carriage-return redraws
(the quickstart's log held ~100 KB of them). `MTLM_PROGRESS=bar|lines|off` forces a mode.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO


class LineProgress:
    """The part of tqdm's interface that mtlm uses (update, set_postfix, write, close, n, total), writing
    "desc: n/total (p%) elapsed, rate, postfix" lines to `stream` every `every_percent` percent of `total` or
    every `every_s` seconds (whichever comes first), and at the end. `clock` is seconds (time.monotonic)."""

    def __init__(self, total: int, desc: str = "", initial: int = 0, stream: TextIO | None = None,
                 every_percent: float = 10.0, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 unit: str = "it") -> None:
        self.total, self.desc, self.n, self.unit = int(total), desc, int(initial), unit
        self.initial = int(initial)    # done before this process (a resumed run): not in the rate
        self.stream = stream if stream is not None else sys.stderr
        self.every_n = max(1, int(self.total * every_percent / 100)) if self.total else None
        self.every_s, self.clock = every_s, clock
        self.start = self.last_t = clock()
        self.last_n, self.postfix, self.closed = self.n, "", False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if (self.every_n and self.n - self.last_n >= self.every_n) or now - self.last_t >= self.every_s \
                or (self.total and self.n >= self.total):
            self._line(now)

    def set_postfix(self, values: dict | None = None, refresh: bool = False, **kwargs) -> None:
        items = {**(values or {}), **kwargs}
        self.postfix = " ".join(f"{k}={v}" for k, v in items.items())

    def write(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def _line(self, now: float) -> None:
        if self.n == self.last_n and self.n:     # nothing new since the last line
            return
        elapsed = now - self.start
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        rate = f"{(self.n - self.initial) / elapsed:.2f} {self.unit}/s" if elapsed > 0 else ""
        self.write(f"{self.desc}: {done} {elapsed:.0f}s {rate} {self.postfix}".rstrip())
        self.last_n, self.last_t = self.n, now

    def close(self) -> None:
        if not self.closed and self.n != self.last_n:
            self._line(self.clock())
        self.closed = True


class _Off:
    """No progress at all (progress=False, or not the main process); `write` still reaches the user."""

    n = total = 0

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def write(self, message: str) -> None:
        import logging
        logging.getLogger("mtlm").info(message)

    def close(self) -> None:
        pass


def progress_mode(stream: TextIO | None = None) -> str:
    """"bar" on a terminal, "lines" otherwise; MTLM_PROGRESS (bar | lines | off) overrides it. Raises
    ValueError on another MTLM_PROGRESS value."""
    forced = os.environ.get("MTLM_PROGRESS", "").strip().lower()
    if forced:
        if forced not in ("bar", "lines", "off"):
            raise ValueError(f"MTLM_PROGRESS={forced!r}: expected bar, lines or off")
        return forced
    stream = stream if stream is not None else sys.stderr
    return "bar" if hasattr(stream, "isatty") and stream.isatty() else "lines"


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "it"):
    """A progress object for `total` units of work (tqdm on a terminal, `LineProgress` in a log, a silent one
    when not `enabled`): update(n), set_postfix(dict), write(message), close()."""
    mode = progress_mode() if enabled else "off"
    if mode == "off":
        return _Off()
    if mode == "lines":
        return LineProgress(total, desc, initial=initial, unit=unit)
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, unit=unit)
