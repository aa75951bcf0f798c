"""Writing files so that a crash never leaves half of one: write a temporary file beside the
target, flush it to disk, then rename it over the target (a rename is atomic on POSIX). And the
one JSON encoding of fairrecon's records (summary.json, `--json` output).

A leaf module: it imports nothing from fairrecon, so every layer may use it.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask (umask can only be read by setting it)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to `path` via a temporary file in the same folder and a rename."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are ordinary files
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_files(folder: str | Path, files: Mapping[str, str | bytes]) -> None:
    """Write several files into `folder` (created if needed), each atomically, in the given order.

    Callers render every file in memory first, so an error while computing leaves the folder
    as it was; put the file that marks the set complete (e.g. summary.json) last.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic_write(folder / name, data)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A compressed .npz file's bytes."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def json_default(o: Any) -> Any:
    """`json.dumps(..., default=json_default)`: numpy scalars as Python numbers (or bools), paths as strings.

    Anything else is not JSON and raises TypeError (a bug to fix, never a silent `str`).
    """
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
