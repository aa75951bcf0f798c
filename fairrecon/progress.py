"""Training progress for the command line: tqdm bars on a terminal, plain log lines elsewhere.

The cells of an audit train together in one batched loop, so the unit of progress is an epoch
of the whole grid (`train_cells(on_epoch=...)`). When an audit trains its grid in several chunks
(several `train_cells` calls, each counting epochs from 1), each chunk gets its own bar and an
overall bar counts epochs across chunks; tell `Progress` how many with `chunks=`.

Not a terminal (CI logs, pipes): one plain line per ~10% of training with elapsed time and ETA,
so a log stays short and readable. quiet: nothing at all.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

LOG_STEPS = 10  # plain-line mode: about this many progress lines per training run


class Progress:
    """`log(message)` for stage lines and `on_epoch(epoch, epochs)` for training; use as a context manager."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False, bars: bool | None = None,
                 chunks: int = 1, prefix: str = "[fairrecon] "):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.bars = (not quiet) and (bars if bars is not None else _is_terminal(self.stream))
        self.chunks = max(1, chunks)
        self.prefix = prefix
        self.chunk = 0  # chunks started so far
        self._bar: tqdm | None = None
        self._overall: tqdm | None = None
        self._start = 0.0
        self._last_event = time.perf_counter()  # a chunk's clock starts at the event before its first epoch
        self._last_logged = -1

    def log(self, message: str) -> None:
        self._last_event = time.perf_counter()
        if self.quiet:
            return
        line = f"{self.prefix}{message}"
        if self._bar is not None:
            tqdm.write(line, file=self.stream)  # above the bars, without breaking them
        else:
            print(line, file=self.stream, flush=True)

    def on_epoch(self, epoch: int, epochs: int) -> None:
        """Called by train_cells after each epoch; epoch counts from 1 and restarts at each chunk."""
        if self.quiet:
            return
        now = time.perf_counter()
        if epoch == 1 or self.chunk == 0:
            self._new_chunk(epochs)
        self._last_event = now
        if self.bars:
            self._bar.update(epoch - self._bar.n)
            if self._overall is not None:
                self._overall.update(1)
            if epoch == epochs:
                self._close_bars()
            return
        step = epoch * LOG_STEPS // epochs
        if step != self._last_logged or epoch == epochs:
            self._last_logged = step
            elapsed, done, total = now - self._start, (self.chunk - 1) * epochs + epoch, epochs * self.chunks
            eta = elapsed / done * (total - done)  # for the whole grid, all chunks
            where = f"chunk {self.chunk}/{self.chunks} " if self.chunks > 1 else ""
            overall = f", overall {done / total:.0%}" if self.chunks > 1 else ""
            self.log(f"{where}epoch {epoch}/{epochs} ({epoch / epochs:.0%}{overall}), "
                     f"{_clock(elapsed)} elapsed, ETA {_clock(eta)}")

    def _new_chunk(self, epochs: int) -> None:
        self._close_bars(keep_overall=True)
        self.chunk += 1
        self._last_logged = -1
        if self.chunk == 1:
            self._start = self._last_event
        if not self.bars:
            return
        if self.chunks > 1 and self._overall is None:
            self._overall = tqdm(total=epochs * self.chunks, desc="overall", unit="epoch", file=self.stream,
                                 position=0, dynamic_ncols=True)
        desc = f"chunk {self.chunk}/{self.chunks}" if self.chunks > 1 else "training"
        self._bar = tqdm(total=epochs, desc=desc, unit="epoch", file=self.stream, leave=self.chunks == 1,
                         position=1 if self.chunks > 1 else 0, dynamic_ncols=True)
        started = self._bar._time() - (time.perf_counter() - self._last_event)  # tqdm's clock
        self._bar.start_t = started  # the first epoch ran before this bar existed
        if self._overall is not None and self.chunk == 1:
            self._overall.start_t = started

    def _close_bars(self, keep_overall: bool = False) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not keep_overall and self._overall is not None and self._overall.n >= self._overall.total:
            self._overall.close()
            self._overall = None

    def close(self) -> None:
        self._close_bars()
        if self._overall is not None:
            self._overall.close()
            self._overall = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _clock(seconds: float) -> str:
    """12.3 s, 4 min 05 s, 1 h 02 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
