"""Where an audit's seeds train: here, one after another, or as tasks on a Ray cluster.

The unit of work is the audit's unit of checkpointing (`audit.by_seed`): one seed's cells, which share
their initial weights and batch order. An executor (the seam: `audit.Executor`) takes prepared audits
(`audit.AuditRun`: one, or every audit of a sweep, in one queue), makes a `Task` of each seed they still
have to train (`tasks_of`; a `Job` holds what all tasks of one audit share) and hands each finished task's
`TaskOutput` to its audit (`AuditRun.accept`), in this process, which alone writes results folders.

  LocalExecutor  tasks in this process, one after another, at its threads (a sweep without Ray)
  RayExecutor    tasks on Ray (`pip install "fairrecon[ray]"`): a local Ray on this machine only, or a
                 cluster joined by address; the grouped tensors go into Ray's object store once per audit

A task (`run_task`) resolves its device where it runs, refuses when its audit's identity there differs
from the driver's (another fairrecon or results version, or a device type the identity does not say), sets torch's
threads explicitly (never a default guessed where it runs), trains and measures, and returns the cells' tables,
with each cell's provenance (provenance.py). Ray retries a task whose worker died, `retries` times; after
that the finished tasks' cells are kept and `TasksFailed` names the cells still missing (exit 4: the same
command trains them). This module imports Ray only inside RayExecutor.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from . import provenance
from .audit import AuditRun, default_threads, train_and_measure, usable_cpus
from .errors import TasksFailed, UserError
from .generate import Assigner
from .grid import Cell, TrainConfig
from .groups import GroupedData
from .measure import example_reconstructions
from .memory import resolve_device
from .progress import _clock
from .resultsdir import Identity, result_fields
from .spec import AuditSpec
from .version import RESULTS_VERSION, __version__

INSTALL = 'pip install "fairrecon[ray]"'
DEFAULT_RETRIES = 2  # Ray retries a task whose worker died this many times before it counts as failed
# Ray's own switch (ray_constants.ENABLE_RAY_CLUSTER, read when ray is imported) that makes a node take the
# loopback address: every process of a local Ray then listens on 127.0.0.1 only (see `start_local_ray`).
RAY_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass(frozen=True)
class Job:
    """What every task of one audit needs besides its cells: the spec, the identity the driver computed,
    the training settings, how generated images get a group, and the grouped tensors (`data`, kept on the
    driver; RayExecutor ships them through the object store instead)."""

    key: str  # the audit, in messages: its results folder, or its name in a sweep
    spec: AuditSpec
    identity: Identity
    config: TrainConfig
    generation: tuple[Assigner, int] | None
    data: GroupedData | None
    version: str = __version__  # the driver's fairrecon


@dataclass
class TaskOutput:
    """A finished task: per cell its tables (provenance included), the task's timings, seed 0's examples."""

    tables: dict[Cell, dict[str, pd.DataFrame]]
    timings: dict[str, float]
    examples: dict[str, Any]
    seconds: float
    where: dict[str, object]  # provenance.here() of the process that trained it


@dataclass(frozen=True)
class Task:
    """One seed's cells of one audit, and what to do with them once trained (runs on the driver)."""

    job: Job
    cells: list[Cell]
    on_done: Callable[[TaskOutput], None] = field(compare=False)

    @property
    def label(self) -> str:
        seeds = sorted({c.seed for c in self.cells})
        return f"{self.job.key} seed {','.join(map(str, seeds))}"


def check_identity(job: Job, device: torch.device) -> None:
    """Refuse to train where this audit's identity would differ from the one the driver checkpoints under."""
    here = socket.gethostname()
    if job.version != __version__:
        raise UserError(
            f"{job.key}: the worker on {here} runs fairrecon {__version__}, the driver {job.version}; "
            "install the same version on every node"
        )
    if job.identity.results_version != RESULTS_VERSION:  # the same version, edited: its numbers would differ
        raise UserError(
            f"{job.key}: the worker on {here} computes results version {RESULTS_VERSION}, the driver's audit "
            f"{job.identity.results_version}; run the same fairrecon on every node"
        )
    fields = result_fields(job.spec, device.type)
    if fields != job.identity.fields:
        changed = sorted(
            k for k in set(fields) | set(job.identity.fields) if fields.get(k) != job.identity.fields.get(k)
        )
        said = "; ".join(f"{k} {job.identity.fields.get(k)!r} -> {fields.get(k)!r}" for k in changed)
        raise UserError(f"{job.key}: on the worker on {here} this audit's identity differs from the driver's ({said})")


def run_task(job: Job, data: GroupedData, cells: list[Cell], threads: int, executor: str) -> TaskOutput:
    """Train and measure one task's cells where this runs, at exactly `threads` intra-op threads."""
    start = time.perf_counter()
    device = resolve_device(job.spec.device)
    check_identity(job, device)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        timings = {"train_s": 0.0, "measure_s": 0.0, "curves_s": 0.0}
        examples: dict[str, Any] = {}

        def keep_examples(stacked) -> None:  # as the in-process loop does: seed 0's reconstructions
            if min(c.seed for c in stacked.cells) == 0:
                examples.update(example_reconstructions(stacked, data, device=device))

        quiet = lambda *a: None  # noqa: E731  (a task's progress is its finishing: TaskProgress)
        tables = train_and_measure(
            data, cells, job.config, device, quiet, timings, quiet, keep_examples, generation=job.generation
        )
        where = provenance.here(device, threads, executor)
    finally:
        torch.set_num_threads(before)
    for cell in cells:
        tables[cell]["provenance"] = provenance.table(cell, where)
    return TaskOutput(tables, timings, examples, time.perf_counter() - start, where)


class TaskProgress:
    """One log line per finished task: which, where, how long, and the ETA of the rest."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.log, self.done, self.start = total, log, 0, time.perf_counter()

    def finished(self, task: Task, output: TaskOutput) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        self.log(
            f"done: {task.label} ({len(task.cells)} cells, {output.seconds:.1f} s on {output.where['host']}, "
            f"{output.where['device']}); {self.done}/{self.total} tasks, {_clock(elapsed)} elapsed, ETA {_clock(eta)}"
        )


class LocalExecutor:
    """Tasks in this process, one after another, at `threads` intra-op threads (default: every usable CPU)."""

    name = "in-process"

    def __init__(self, threads: int | None = None):
        self.threads, self.threads_chosen = (threads, "given") if threads is not None else default_threads()

    def device_type(self, spec: AuditSpec) -> str:
        return resolve_device(spec.device).type

    def describe(self) -> str:
        return f"this process ({self.threads} thread(s))"

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "threads": self.threads}

    def run(self, runs: list[AuditRun], log: Callable[[str], None]) -> None:
        tasks = tasks_of(runs)
        progress = TaskProgress(len(tasks), log)
        for task in tasks:
            output = run_task(task.job, task.job.data, task.cells, self.threads, self.name)
            task.on_done(output)
            progress.finished(task, output)

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tasks_of(runs: list[AuditRun]) -> list[Task]:
    """Every seed the audits still have to train, as tasks, each handing its output to its audit."""
    tasks = []
    for run in runs:
        job = Job(run.name, run.spec, run.identity, run.config, run.generation, run.data)
        done = lambda output, run=run: run.accept(output.tables, output.timings, output.examples)  # noqa: E731
        tasks += [Task(job, cells, done) for cells in run.todo]
    return tasks


def _ray_task(job: Job, data: GroupedData, cells: list[Cell], threads: int) -> TaskOutput:
    """The Ray task: run_task in a Ray worker (`data` arrives from the object store)."""
    return run_task(job, data, cells, threads, "ray")


def require_ray() -> None:
    """The one-line error that says how to install Ray, when it is not (without importing it)."""
    if importlib.util.find_spec("ray") is None:
        raise UserError(f"--executor ray needs Ray, which is not installed: {INSTALL}")


def ray_module():
    """`import ray`, or the one-line error that says how to install it."""
    require_ray()
    import ray

    return ray


def start_local_ray(
    num_cpus: int,
    *,
    num_gpus: int | None = None,
    object_store_memory: int | None = None,
    dashboard: bool = False,
    log_to_driver: bool = True,
):
    """Start a new Ray on this machine that listens on 127.0.0.1 only, dashboard off unless asked for.

    Ray gives a node a loopback address only when its `RAY_LOCAL_ONLY_ENV` switch is off at `import ray`
    (ray.init resolves 127.0.0.1 to the machine's network address otherwise), so the switch is set around
    the import; every Ray process then binds its ports to 127.0.0.1 (checked: tests/test_ray.py connects
    to the GCS port through the network address and is refused). If ray was imported earlier with the switch
    on, the node would listen on the network: then it is shut down again and this refuses. A token that Ray
    generates here (token authentication, ~/.ray/auth_token) is made readable by this user only.
    Returns ray's context (address_info: the node's address, GCS address, session folder).
    """
    token = Path.home() / ".ray" / "auth_token"  # where Ray writes a token it generates
    token_existed = token.exists()
    if "ray" not in sys.modules:
        before = os.environ.get(RAY_LOCAL_ONLY_ENV)
        os.environ[RAY_LOCAL_ONLY_ENV] = "0"
        try:
            ray = ray_module()
        finally:
            if before is None:
                os.environ.pop(RAY_LOCAL_ONLY_ENV, None)
            else:
                os.environ[RAY_LOCAL_ONLY_ENV] = before
    else:
        ray = ray_module()
    try:
        context = ray.init(
            address="local",  # a new Ray: never RAY_ADDRESS's or one that `ray start` left on this machine
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            object_store_memory=object_store_memory,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            logging_level=logging.WARNING,
            log_to_driver=log_to_driver,
        )
    except Exception as e:  # ray raises a bare Exception when the dashboard's packages are missing
        if not (dashboard and "missing packages" in str(e)):
            raise
        ray.shutdown()
        raise UserError('--ray-dashboard needs the dashboard\'s packages: pip install "ray[default]"') from None
    if not token_existed and token.exists() and token.stat().st_mode & 0o077:
        token.chmod(0o600)  # Ray writes the token it generates with the umask's mode (0644: readable by all users)
    node = context.address_info["node_ip_address"]
    if not ipaddress.ip_address(node).is_loopback:
        ray.shutdown()
        raise UserError(
            f"the local Ray would listen on the network ({node}), not only on this machine: ray was imported "
            f"before fairrecon started it; set {RAY_LOCAL_ONLY_ENV}=0 before importing ray, or start Ray yourself "
            "and pass --ray-address"
        )
    return context


class RayExecutor:
    """Tasks on Ray: each asks for `cpus_per_task` CPUs and `gpus_per_task` GPUs and trains at `threads`
    intra-op threads (default: its CPUs); a task whose worker dies is retried `retries` times.

    `address`: None starts a local Ray on this machine only (`start_local_ray`, `local_cpus` CPUs: default
    every usable CPU), unless this process is already connected to a Ray (`ray.init` before), which it then
    uses and leaves running; "auto" joins the Ray started on this machine with `ray start`; "HOST:PORT" joins
    that cluster, shipping this fairrecon to its workers (runtime_env py_modules). See docs/scale.md.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        cpus_per_task: int = 1,
        gpus_per_task: float = 0,
        threads: int | None = None,
        retries: int = DEFAULT_RETRIES,
        dashboard: bool = False,
        local_cpus: int | None = None,
        object_store_memory: int | None = None,
        quiet: bool = False,
    ):
        require_ray()  # not installed: the one-line error now, before any work (importing it waits: start_local_ray)
        for name, value, least in (("cpus per task", cpus_per_task, 1), ("retries", retries, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"{name} must be a whole number >= {least}, got {value!r}")
        if isinstance(gpus_per_task, bool) or not isinstance(gpus_per_task, (int, float)) or not gpus_per_task >= 0:
            raise UserError(f"gpus per task must be a number >= 0, got {gpus_per_task!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise UserError(f"threads must be a whole number >= 1, got {threads!r}")
        if address is not None and (dashboard or local_cpus is not None or object_store_memory is not None):
            raise UserError("the dashboard, local CPUs and object store size apply only to a local Ray (no address)")
        self.address, self.cpus, self.gpus, self.retries = address, cpus_per_task, gpus_per_task, retries
        self.dashboard, self.local_cpus, self.object_store_memory = dashboard, local_cpus, object_store_memory
        self.quiet = quiet
        self.threads, self.threads_chosen = (
            (threads, "given") if threads is not None else (cpus_per_task, "per task: its CPUs")
        )
        self._ray = None
        self._started = False  # whether close() shuts down the Ray that this executor started

    def device_type(self, spec: AuditSpec) -> str:
        """The device type tasks train on, for the identity: the driver's own devices do not count."""
        if spec.device == "cuda" and not self.gpus:
            raise UserError("--device cuda with --executor ray needs --gpus-per-task > 0 (Ray hides GPUs from tasks)")
        if spec.device == "cpu" and self.gpus:
            raise UserError(f"--gpus-per-task {self.gpus:g} with --device cpu: the GPUs would sit idle; drop one")
        return "cuda" if self.gpus else "cpu"

    def describe(self) -> str:
        where = "a local Ray on this machine" if self.address is None else f"the Ray cluster at {self.address}"
        return f"{where} ({self.cpus} CPU(s), {self.gpus:g} GPU(s) and {self.threads} thread(s) per task)"

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.address or "local",
            "cpus_per_task": self.cpus,
            "gpus_per_task": self.gpus,
            "threads_per_task": self.threads,
            "retries": self.retries,
        }

    def connect(self, log: Callable[[str], None] = lambda m: None):
        """Connect (once): join the Ray this process already has, start a local one, or join `address`."""
        if self._ray is not None:
            return self._ray
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            if self.address is not None or self.dashboard or self.local_cpus or self.object_store_memory:
                raise UserError(
                    "this process is already connected to a Ray (ray.init), which fairrecon would use as it is: "
                    "drop the address and local Ray settings, or call ray.shutdown() first"
                )
            log("using the Ray this process is already connected to")
        elif self.address is None:
            start = time.perf_counter()
            context = start_local_ray(
                self.local_cpus or usable_cpus()[0],
                object_store_memory=self.object_store_memory,
                dashboard=self.dashboard,
                log_to_driver=not self.quiet,
            )
            self._started = True
            shown = f"; dashboard at http://{context.dashboard_url}" if self.dashboard else ""
            log(f"started a local Ray on 127.0.0.1 in {time.perf_counter() - start:.1f} s{shown}")
        else:
            try:
                ray_module().init(
                    address=self.address,
                    runtime_env={"py_modules": [str(Path(__file__).parent)]},  # the workers run this fairrecon
                    logging_level=logging.WARNING,
                    log_to_driver=not self.quiet,
                )
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise UserError(f"cannot join the Ray cluster at {self.address}: {_first_line(e)}") from None
            except Exception as e:  # ray.exceptions.AuthenticationError and the like
                if type(e).__name__ != "AuthenticationError":
                    raise
                raise UserError(
                    f"cannot join the Ray cluster at {self.address}: {_first_line(e)} (set RAY_AUTH_MODE=token and "
                    "the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token: docs/scale.md)"
                ) from None
            self._started = True
        ray = ray_module()
        total = ray.cluster_resources()
        for what, want, key in (("CPUs", self.cpus, "CPU"), ("GPUs", self.gpus, "GPU")):
            if want and total.get(key, 0) < want:
                raise UserError(f"each task asks for {want:g} {what}, but the Ray cluster has {total.get(key, 0):g}")
        self._ray = ray
        return ray

    def run(self, runs: list[AuditRun], log: Callable[[str], None]) -> None:
        """Submit every seed still to train as a task, collect them as they finish (each handed to its
        audit here), then raise for the ones that failed: UserError when a worker refused, TasksFailed
        otherwise."""
        self.run_tasks(tasks_of(runs), log)

    def run_tasks(self, tasks: list[Task], log: Callable[[str], None]) -> None:
        """`run` for tasks already made (`tasks_of`)."""
        if not tasks:
            return
        ray = self.connect(log)
        remote = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=self.retries, retry_exceptions=False)(
            _ray_task
        )
        shipped: dict[int, tuple[Job, Any]] = {}  # per audit: the job without its tensors, and their object ref
        for task in tasks:
            if id(task.job) not in shipped:
                shipped[id(task.job)] = (dataclasses.replace(task.job, data=None), ray.put(task.job.data))
        pending = {
            remote.options(name=f"fairrecon {task.label}").remote(
                *shipped[id(task.job)], task.cells, self.threads
            ): task
            for task in tasks
        }
        progress = TaskProgress(len(tasks), log)
        failed: list[tuple[Task, BaseException]] = []
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                task = pending.pop(ready[0])
                try:
                    output = ray.get(ready[0])
                except ray.exceptions.RayTaskError as e:  # the task raised: a refusal, or a bug
                    failed.append((task, e.cause if isinstance(e.cause, BaseException) else e))
                    log(f"failed: {task.label}: {_first_line(failed[-1][1])}")
                    continue
                except ray.exceptions.RayError as e:  # its worker or node died, past the retries; out of memory
                    failed.append((task, e))
                    log(f"failed: {task.label}: {_reason(e, self.retries)}")
                    continue
                task.on_done(output)
                progress.finished(task, output)
        except BaseException:  # interrupted: stop what still runs (a local Ray goes down with close())
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        if failed:
            raise _failure(failed, self.retries, len(tasks))

    def close(self) -> None:
        if self._started and self._ray is not None:
            self._ray.shutdown()
        self._ray, self._started = None, False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _reason(e: BaseException, retries: int) -> str:
    """A failed task's cause in a few words."""
    kind = type(e).__name__
    if kind == "WorkerCrashedError":
        return f"its worker died (killed or crashed) {retries + 1} time(s), {retries} retries"
    if kind == "NodeDiedError":
        return "the node running it died"
    if kind == "OutOfMemoryError":
        return "Ray stopped it: its node ran out of memory"
    return f"{kind}: {_first_line(e)}"


def _failure(failed: list[tuple[Task, BaseException]], retries: int, total: int) -> Exception:
    """The error for tasks that failed: a worker's refusal is the user's to fix (UserError); anything else
    is TasksFailed, naming the cells still to train."""
    for _, e in failed:
        if isinstance(e, UserError):
            more = f" ({len(failed) - 1} other task(s) failed too)" if len(failed) > 1 else ""
            return UserError(f"{e}{more}")
    by_job: dict[str, list[str]] = {}
    for task, _ in failed:
        by_job.setdefault(task.job.key, []).extend(c.key for c in task.cells)
    cells = "; ".join(f"{key}: {', '.join(keys)}" for key, keys in by_job.items())
    first = _reason(failed[0][1], retries)
    details = "\n\n".join(f"{task.label}:\n{e}" for task, e in failed)
    return TasksFailed(
        f"{len(failed)} of {total} task(s) failed ({first}); cells not trained: {cells}; the finished cells are "
        "saved: run the same command again to train the rest",
        details,
    )
