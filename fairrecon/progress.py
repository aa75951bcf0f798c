"""Training progress for the command line: tqdm bars on a terminal, plain log lines elsewhere.

An audit trains its cells seed by seed (all losses of a seed batched together), so the units
are an epoch of a seed and the seeds: `run_audit(on_epoch=progress.on_epoch)` calls
`on_epoch(epoch, epochs, seed, seeds)` after every epoch (`seed` counts from 1). On a terminal
there is a bar per seed and, with several seeds, an overall bar; both show an ETA.

Not a terminal (CI logs, pipes): one plain line per ~10% of all training, with elapsed time
and the ETA, so a log stays short. quiet: nothing at all.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

LOG_STEPS = 10  # plain-line mode: about this many progress lines per audit


class Progress:
    """`log(message)` for stage lines and `on_epoch(...)` for training; use as a context manager."""

    def __init__(
        self, stream: TextIO | None = None, quiet: bool = False, bars: bool | None = None, prefix: str = "[fairrecon] "
    ):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.bars = (not quiet) and (bars if bars is not None else _is_terminal(self.stream))
        self.prefix = prefix
        self.seed = 0  # the seed now training (counted from 1); 0 before training
        self._bar: tqdm | None = None
        self._overall: tqdm | None = None
        self._start: float | None = None
        self._last_event = time.perf_counter()  # training's clock starts at the event before its first epoch
        self._last_logged = -1

    def log(self, message: str) -> None:
        self._last_event = time.perf_counter()
        if self.quiet:
            return
        line = f"{self.prefix}{message}"
        if self._bar is not None or self._overall is not None:
            tqdm.write(line, file=self.stream)  # above the bars, without breaking them
        else:
            print(line, file=self.stream, flush=True)

    def on_epoch(self, epoch: int, epochs: int, seed: int = 1, seeds: int = 1) -> None:
        """After each epoch: `epoch` of `epochs` (from 1) of the `seed`-th of `seeds` seeds (from 1)."""
        if self.quiet:
            return
        now = time.perf_counter()
        if self._start is None:
            self._start = self._last_event
        if seed != self.seed:
            self._new_seed(epochs, seed, seeds)
        self._last_event = now
        done, total = (seed - 1) * epochs + epoch, epochs * seeds
        if self.bars:
            self._bar.update(epoch - self._bar.n)
            if self._overall is not None:
                self._overall.update(done - self._overall.n)
            if done == total:
                self.close()
            return
        step = done * LOG_STEPS // total
        if step != self._last_logged or done == total:
            self._last_logged = step
            elapsed = now - self._start
            where = f"seed {seed}/{seeds}, " if seeds > 1 else ""
            self.log(
                f"{where}epoch {epoch}/{epochs} ({done / total:.0%} of training), "
                f"{_clock(elapsed)} elapsed, ETA {_clock(elapsed / done * (total - done))}"
            )

    def _new_seed(self, epochs: int, seed: int, seeds: int) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.seed = seed
        if not self.bars:
            return
        if seeds > 1 and self._overall is None:
            self._overall = tqdm(
                total=epochs * seeds,
                initial=(seed - 1) * epochs,
                desc="overall",
                unit="epoch",
                file=self.stream,
                position=0,
                dynamic_ncols=True,
            )
            self._overall.start_t = self._tqdm_time(self._start)
        self._bar = tqdm(
            total=epochs,
            desc=f"seed {seed}/{seeds}" if seeds > 1 else "training",
            unit="epoch",
            file=self.stream,
            leave=seeds == 1,
            position=1 if seeds > 1 else 0,
            dynamic_ncols=True,
        )
        self._bar.start_t = self._tqdm_time(self._last_event)  # the first epoch ran before this bar existed

    @staticmethod
    def _tqdm_time(perf: float) -> float:
        """A time.perf_counter() reading on tqdm's clock (time.time)."""
        return time.time() - (time.perf_counter() - perf)

    def close(self) -> None:
        for bar in (self._bar, self._overall):
            if bar is not None:
                bar.close()
        self._bar = self._overall = None

    def __enter__(self) -> Progress:
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
