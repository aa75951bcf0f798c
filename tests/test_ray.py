"""--executor ray on a real local Ray: the same numbers as in-process, listening on this machine only, and
a killed worker: retried, or (past its retries) its cells named, exit 4, and the same command finishes.

Workers are killed for real (SIGKILL to the process whose title Ray set to "ray::fairrecon <audit> seed k"
while it trains), and the Ray processes found through /proc are this test's own descendants only.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, run_cli

from fairrecon import AuditSpec, run_audit
from fairrecon.errors import UserError
from fairrecon.grid import Cell, TrainConfig
from fairrecon.results import AuditResult
from fairrecon.resultsdir import Identity
from fairrecon.resume import CellStore

# Ray is imported by fairrecon only (never here at import time: a local Ray started after an earlier
# `import ray` would listen on the network, and fairrecon refuses that). CI installs the test extra, which
# has Ray, so there these tests must run.
if importlib.util.find_spec("ray") is None and not os.environ.get("CI"):
    pytest.skip("Ray is not installed (pip install -e '.[test]' brings it)", allow_module_level=True)

from fairrecon import executor as executor_module  # noqa: E402
from fairrecon.data import load_images  # noqa: E402
from fairrecon.executor import Job, RayExecutor, Task, start_local_ray  # noqa: E402
from fairrecon.groups import make_groups  # noqa: E402
from fairrecon.sweep import run_sweep  # noqa: E402

# Fashion-MNIST at the default width (digits at 8x8 would not exercise threads or the conv model);
# three seeds = three tasks, two at a time on the two CPUs of the local Ray.
SMALL = dict(
    dataset="fashion-mnist",
    limit=256,
    test_limit=128,
    epochs=2,
    seeds=3,
    losses=("l1", "learned-sigma"),
    device="cpu",
    grad_points=2,
)
TABLES = ("samples", "cells", "history", "curves", "grad_shares")


def spec_file(folder: Path, data_root: Path) -> Path:
    """SMALL as a spec file (grad_points has no flag)."""
    path = folder / "small.toml"
    lines = [f"{key} = {list(v) if isinstance(v, tuple) else v!r}".replace("'", '"') for key, v in SMALL.items()]
    path.write_text("\n".join([*lines, f'data_root = "{data_root}"', ""]))
    return path


def assert_same(a: AuditResult, b: AuditResult) -> None:
    for name in TABLES:
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name), check_exact=True, obj=name)
    assert a.examples.keys() == b.examples.keys()
    for key in a.examples:
        np.testing.assert_array_equal(a.examples[key], b.examples[key], err_msg=key)


def descendants(root: int) -> set[int]:
    """Every process below `root`, from /proc's parent links."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


def training_workers(root: int) -> list[int]:
    """Ray workers below `root` that are running a fairrecon task now (Ray titles them 'ray::<task name>')."""
    pids = []
    for pid in descendants(root):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if title.startswith("ray::fairrecon "):
            pids.append(pid)
    return sorted(pids)


def kill_first_worker(root: int, timeout: float = 120.0) -> tuple[int, str]:
    """SIGKILL the first worker seen training under `root`; its pid and its title (which task)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{root}").exists():
        for pid in training_workers(root):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
                time.sleep(0.3)  # mid-task: it has started training
                os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue
            return pid, title
        time.sleep(0.05)
    raise AssertionError("no fairrecon task was seen running")


@pytest.fixture(scope="module")
def reference(shared_datasets):
    """The audit in-process, at one thread (each Ray task trains at one thread too)."""
    return run_audit(**SMALL, data_root=str(shared_datasets), threads=1)


# ---------------------------------------------------------------- the command line (each its own local Ray)


@pytest.mark.slow  # starts Ray (seconds)
def test_failed_tasks_exit_4_name_their_cells_and_the_same_command_finishes(shared_datasets, reference, tmp_path):
    """--task-retries 0 and a worker killed mid-task: the other seeds are saved, one line names the killed
    seed's cells, exit 4; the same command then trains only those and ends exactly as the in-process audit."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fairrecon", "audit", str(spec_file(tmp_path, shared_datasets)), "--out", str(out)]
    command += ["--executor", "ray", "--task-retries", "0", "--threads", "1"]
    home = tmp_path / "home"  # a user without a Ray token yet: the local Ray generates one
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(home)}
    run = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        killed, title = kill_first_worker(run.pid)
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    seed = int(title.rsplit(" ", 1)[1])
    assert run.returncode == 4, stderr
    assert (home / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600  # Ray wrote it 0644
    error = [line for line in stderr.splitlines() if line.startswith("fairrecon: error:")]
    assert len(error) == 1, stderr
    missing = [f"{loss}/seed{seed}" for loss in SMALL["losses"]]
    assert "1 of 3 task(s) failed (its worker died" in error[0] and f"cells not trained: {out}: " in error[0]
    assert ", ".join(missing) in error[0] and "run the same command again" in error[0]
    store = CellStore(out, Identity.of(reference.spec.replace(out=str(out)), "cpu"))
    done = {Cell(loss, s) for loss in SMALL["losses"] for s in range(3) if store.done(Cell(loss, s))}
    assert done == {Cell(loss, s) for loss in SMALL["losses"] for s in range(3) if s != seed}
    assert (out / "fairrecon-error.log").read_text().count("seed") >= 1

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming: 4 of 6 cells already done" in again.stderr
    result = AuditResult.load(out)
    assert result.info["resumed_cells"] == 4 and result.info["executor"]["retries"] == 0
    assert_same(result, reference)


def test_ray_without_ray_installed_is_one_line_exit_2(monkeypatch, capsys):
    real = executor_module.importlib.util.find_spec
    monkeypatch.setattr(
        executor_module.importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    code, out, err = run_cli(capsys, "audit", "--executor", "ray", "--seeds", "1", "--epochs", "1")
    assert code == 2 and err.strip().splitlines() == [
        'fairrecon: error: --executor ray needs Ray, which is not installed: pip install "fairrecon[ray]"'
    ]


@pytest.mark.parametrize(
    "option", [["--ray-address", "auto"], ["--cpus-per-task", "2"], ["--task-retries", "1"], ["--ray-dashboard"]]
)
def test_ray_options_without_the_ray_executor_are_refused(capsys, option):
    code, out, err = run_cli(capsys, "audit", *option)
    assert code == 2 and f"{option[0]} applies only with --executor ray" in err


def test_devices_the_tasks_cannot_have_are_refused():
    with pytest.raises(UserError, match="needs --gpus-per-task"):
        RayExecutor(gpus_per_task=0).device_type(AuditSpec(device="cuda"))
    with pytest.raises(UserError, match="the GPUs would sit idle"):
        RayExecutor(gpus_per_task=1).device_type(AuditSpec(device="cpu"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # starts Ray (seconds)
def test_joining_a_cluster_by_address_needs_its_token(tmp_path):
    """A head started the way docs/scale.md says (a token first, RAY_AUTH_MODE=token; here on 127.0.0.1):
    a driver without the token is refused in one line (exit 2); with it, the audit runs there, fairrecon's
    code shipped to the workers, and gives the in-process numbers."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    home, stranger = tmp_path / "home", tmp_path / "stranger"
    stranger.mkdir()
    base = {**os.environ, "PYTHONPATH": str(REPO), executor_module.RAY_LOCAL_ONLY_ENV: "0"}
    subprocess.run([ray_cli, "get-auth-token", "--generate"], env={**base, "HOME": str(home)}, capture_output=True)
    assert (home / ".ray" / "auth_token").is_file()
    port, temp = free_port(), tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's sockets want a short path
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--port", str(port), "--num-cpus", "2", "--temp-dir", temp]
        + ["--include-dashboard", "false", "--disable-usage-stats"],
        env={**base, "HOME": str(home), "RAY_AUTH_MODE": "token"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and head.poll() is None, "the head did not start"
                time.sleep(0.5)
        spec = ["--seeds", "2", "--epochs", "1", "--losses", "l1", "--latent", "8", "--device", "cpu"]
        join = ["--executor", "ray", "--ray-address", f"127.0.0.1:{port}", "--threads", "1"]
        command = [sys.executable, "-m", "fairrecon", "audit", *spec, *join]
        refused = subprocess.run(
            [*command, "--out", str(tmp_path / "refused")],
            env={**base, "HOME": str(stranger), "RAY_AUTH_MODE": "token"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        error = [line for line in refused.stderr.splitlines() if line.startswith("fairrecon: error:")]
        assert refused.returncode == 2 and len(error) == 1, refused.stderr
        assert f"cannot join the Ray cluster at 127.0.0.1:{port}: Token authentication is enabled" in error[0]
        joined = subprocess.run(
            [*command, "--out", str(tmp_path / "joined")],
            env={**base, "HOME": str(home), "RAY_AUTH_MODE": "token"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert joined.returncode == 0, joined.stderr
    finally:
        head.terminate()
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
    spec = dict(dataset="digits", seeds=2, epochs=1, losses=("l1",), latent=8, device="cpu")
    here = run_audit(**spec, threads=1, out=str(tmp_path / "here"))
    assert here.cells["status"].eq("ok").all()
    for name in ("samples.csv", "cells.csv", "history.csv", "curves.csv"):
        assert (tmp_path / "joined" / name).read_bytes() == (tmp_path / "here" / name).read_bytes(), name
    info = AuditResult.load(tmp_path / "joined").info
    assert info["executor"]["address"] == f"127.0.0.1:{port}"
    assert {row["executor"] for row in info["provenance"]} == {"ray"}


# ---------------------------------------------------------------- a local Ray in this process


@pytest.fixture(scope="module")
def local_ray():
    """fairrecon's own local Ray, at the size CI can afford: 2 CPUs, 200 MiB of object store, no dashboard."""
    context = start_local_ray(num_cpus=2, object_store_memory=200 * 2**20)
    yield context
    sys.modules["ray"].shutdown()


def network_address() -> str | None:
    """This machine's address on its network (the route out; no packet is sent), None if it has none."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if ipaddress.ip_address(address).is_loopback else address


def listening(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets the processes `pids` listen on (from /proc/net/tcp, tcp6)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                continue
            host, port = cols[1].split(":")
            raw = b"".join(bytes.fromhex(host[i : i + 8])[::-1] for i in range(0, len(host), 8))
            ip = ipaddress.ip_address(raw)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            found.append(f"{ip}:{int(port, 16)}")
    return found


@pytest.mark.slow  # starts Ray (seconds)
def test_the_local_ray_listens_on_this_machine_only(local_ray):
    assert ipaddress.ip_address(local_ray.address_info["node_ip_address"]).is_loopback
    assert not local_ray.dashboard_url  # no dashboard unless asked for
    ports = listening(descendants(os.getpid()) | {os.getpid()})
    assert len(ports) >= 3, ports  # the GCS, the raylet, the workers and this driver listen
    assert all(ipaddress.ip_address(p.rsplit(":", 1)[0]).is_loopback for p in ports), ports
    address = network_address()
    if address is None:
        pytest.skip("this machine has no network address to try the GCS port from")
    gcs_port = int(local_ray.address_info["gcs_address"].rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError), socket.create_connection((address, gcs_port), timeout=5):
        pass


@pytest.mark.slow  # starts Ray (seconds)
@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_ray_gives_exactly_the_in_process_audit(local_ray, shared_datasets, reference, model):
    """samples, cells, history, curves, grad_shares and the example reconstructions, to the bit."""
    spec = {**SMALL, "model": model, "data_root": str(shared_datasets)}
    here = reference if model == "mlp" else run_audit(**spec, threads=1)
    with RayExecutor(cpus_per_task=1) as runner:
        on_ray = run_audit(**spec, executor=runner)
    assert_same(on_ray, here)
    where = pd.DataFrame(on_ray.info["provenance"])
    assert (where["executor"] == "ray").all() and (where["threads"] == 1).all() and len(where) == 6
    assert on_ray.info["executor"] == {
        "name": "ray",
        "address": "local",
        "cpus_per_task": 1,
        "gpus_per_task": 0,
        "threads_per_task": 1,
        "retries": 2,
    }
    assert on_ray.info["threads"] == 1 and on_ray.info["device"] == "cpu"


@pytest.mark.slow  # starts Ray (seconds)
def test_a_killed_worker_is_retried_and_the_audit_is_unchanged(local_ray, shared_datasets, reference, tmp_path):
    lines: list[str] = []
    outcome: dict = {}

    def audit():
        try:
            with RayExecutor(cpus_per_task=1, retries=1) as runner:
                outcome["result"] = run_audit(
                    **SMALL, data_root=str(shared_datasets), executor=runner, log=lines.append, out=str(tmp_path)
                )
        except BaseException as e:  # noqa: BLE001  (reported by the assertion below)
            outcome["error"] = e

    driver = threading.Thread(target=audit)
    driver.start()
    killed, title = kill_first_worker(os.getpid())
    driver.join(timeout=300)
    assert not driver.is_alive() and "error" not in outcome, outcome.get("error")
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)  # it was a real worker, and it is dead
    assert not [line for line in lines if line.startswith("failed")]
    assert_same(outcome["result"], reference)


@pytest.mark.slow  # starts Ray (seconds)
def test_a_worker_s_refusal_reaches_the_driver_as_one_line(local_ray):
    """A task whose identity differs where it runs (here: the driver's says cuda, the worker has a CPU) refuses;
    the driver raises the worker's UserError, not Ray's wrapped traceback."""
    spec = AuditSpec(dataset="digits", seeds=1, epochs=1, losses=("l1",), device="auto")
    data = make_groups(load_images("digits"), spec)
    job = Job("results/gpu", spec, Identity.of(spec, "cuda"), TrainConfig.from_spec(spec), None, data)
    done: list = []
    with RayExecutor() as runner, pytest.raises(UserError) as refused:
        runner.run_tasks([Task(job, [Cell("l1", 0)], done.append)], log=lambda line: None)
    assert str(refused.value).startswith("results/gpu: on the worker on ")
    assert "identity differs from the driver's (device_type 'cuda' -> 'cpu')" in str(refused.value)
    assert "\n" not in str(refused.value) and not done


SWEEP = """
[sweep]
out = "{out}"
[audit]
dataset = "digits"
losses = ["l1", "l2"]
seeds = 2
epochs = 2
batch_size = 64
latent = 8
hidden = 32
device = "cpu"
[grid]
proportions = [[0.5, 0.5], [0.8, 0.2]]
"""


@pytest.mark.slow  # starts Ray (seconds)
def test_a_sweep_through_ray_equals_the_sweep_in_process(local_ray, tmp_path):
    """Both settings' seeds (4 tasks) go through one Ray queue; every file equals the in-process sweep's."""
    folders = {}
    for name, runner in (("here", None), ("ray", RayExecutor(cpus_per_task=1))):
        path = tmp_path / f"{name}.toml"
        path.write_text(SWEEP.format(out=tmp_path / name))
        lines: list[str] = []
        report = run_sweep(path, executor=runner, threads=None if runner else 1, log=lines.append)
        folders[name] = tmp_path / name
        assert any(line.startswith("2 settings, 4 tasks (one per seed to train) on ") for line in lines)
    assert [line for line in lines if line.startswith("done:")][-1].endswith("ETA 0.0 s")
    for setting in [s.name for s in report.sweep.settings]:
        for table in ("samples.csv", "cells.csv", "history.csv", "curves.csv", "grad_shares.csv"):
            here, there = (folders[k] / setting / table for k in ("here", "ray"))
            assert here.read_bytes() == there.read_bytes(), (setting, table)
    assert (folders["here"] / "sweep.csv").read_bytes() == (folders["ray"] / "sweep.csv").read_bytes()
