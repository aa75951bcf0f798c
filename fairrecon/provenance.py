"""Where each cell was trained: host, device, library versions, threads and executor.

Recorded per cell with its checkpoint (a one-row `provenance` table beside its samples and cells), so a
resumed audit keeps the provenance of the cells it did not retrain; the audit's `info["provenance"]`
holds every row (summary.json). fairrecon promises identical numbers on one machine and device
(tests/test_ray.py, tests/test_threads.py), not across different CPUs, GPUs or torch versions: an audit
whose cells came from more than one gets a warning (`mixed_warning`).
"""

from __future__ import annotations

import platform
import socket

import pandas as pd
import torch

from .grid import Cell
from .version import __version__

COLUMNS = ("loss", "seed", "host", "device", "device_name", "torch", "fairrecon", "python", "threads", "executor")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's (platform.processor, else the machine type)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def here(device: torch.device, threads: int, executor: str) -> dict[str, object]:
    """This process's provenance for cells trained on `device` at `threads` intra-op threads."""
    return {
        "host": socket.gethostname(),
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "fairrecon": __version__,
        "python": platform.python_version(),
        "threads": threads,
        "executor": executor,
    }


def table(cell: Cell, where: dict[str, object]) -> pd.DataFrame:
    """A cell's one-row provenance table, as checkpointed with its other tables."""
    return pd.DataFrame([{"loss": cell.loss, "seed": cell.seed, **where}], columns=list(COLUMNS))


def mixed_warning(rows: pd.DataFrame) -> str | None:
    """A warning when an audit's cells were trained on more than one machine, device or torch version."""
    if rows.empty:
        return None
    devices = (rows["device"].astype(str) + " (" + rows["device_name"].astype(str) + ")").unique()
    parts = [
        f"{len(values)} {what} ({', '.join(map(str, values))})"
        for what, values in (
            ("machines", rows["host"].astype(str).unique()),
            ("devices", devices),
            ("torch versions", rows["torch"].astype(str).unique()),
        )
        if len(values) > 1
    ]
    if not parts:
        return None
    return (
        f"this audit's cells were trained on {'; '.join(parts)}: each cell is reproducible where it ran, but "
        "results are not promised bit-identical across machines, devices or versions (provenance per cell in "
        "summary.json info.provenance)"
    )
