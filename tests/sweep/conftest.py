"""Real infrastructure for the sweep tests: a two-node Ray cluster and an MLflow server, on free loopback
ports, started once per module and stopped without touching other Ray instances on the machine."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    env: dict[str, str]  # environment for clients: token auth, this venv first on PATH
    gcs_address: str  # for drivers (RAY_ADDRESS) and `ray start --address`
    dashboard: str  # for `ray job submit --address`
    temp_dirs: list[str]

    def processes(self) -> list:
        """This cluster's processes (psutil), workers included: see :func:`cluster_processes`."""
        return cluster_processes(self.temp_dirs, self.gcs_address)


def _start_node(args: Callable[[], list[str]], env: dict[str, str], cwd: Path) -> None:
    """``ray start`` with the arguments ``args()`` gives; again with fresh ones (up to 3 times) when a port picked
    as free was taken meanwhile (Ray: "... is trying to use a port number ... used by other components")."""
    for _ in range(3):
        started = subprocess.run(
            [str(BIN / "ray"), "start", *args()],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        if started.returncode == 0 or "used by other components" not in started.stdout + started.stderr:
            break
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory) -> Cluster:
    """``ray start --head`` plus a second node (``ray start --address``), 3 logical CPUs each, token auth."""
    cwd = tmp_path_factory.mktemp("ray_cwd")
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this venv's
    env["RAY_AUTH_MODE"] = "token"
    env.pop("RAY_ADDRESS", None)
    # Keep idle workers of a job for reuse. With 3 CPUs a node, the Train and Tune actors alone exceed Ray's
    # soft limit on workers, so every Ray Data task worker is killed 1 s after its task and the next task
    # starts (and imports transformers in) a new process.
    env["RAY_idle_worker_killing_time_threshold_ms"] = "300000"
    gcs, dashboard = free_port(), free_port()
    # Short: Ray's unix sockets live under it and socket paths are limited to ~107 characters.
    temps = [tempfile.mkdtemp(prefix="mclray-", dir="/tmp") for _ in range(2)]
    ports = lambda: [  # noqa: E731
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        "--disable-usage-stats",
        "--num-cpus=3",
    ]
    cluster = Cluster(env, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", temps)
    try:
        _start_node(
            lambda: [
                "--head",
                f"--port={gcs}",
                f"--dashboard-port={dashboard}",
                "--dashboard-host=127.0.0.1",
                f"--temp-dir={temps[0]}",
                f"--ray-client-server-port={free_port()}",
                *ports(),
            ],
            env,
            cwd,
        )
        # A second node joins the head's session (its temp dir is the head's); own ports.
        _start_node(lambda: [f"--address={cluster.gcs_address}", *ports()], env, cwd)
        yield cluster
    finally:
        stop_cluster(temps, cluster.gcs_address)
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)


def cluster_processes(temp_dirs: list[str], gcs_address: str) -> list:
    """This cluster's processes (psutil): those naming its temp dirs or GCS address, and their descendants
    (the workers its raylets start)."""
    import psutil

    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            args = " ".join(proc.info["cmdline"] or [])
            if any(t in args for t in temp_dirs) or gcs_address in args:
                roots.append(proc)
    found = {}
    for root in roots:
        found[root.pid] = root
        with contextlib.suppress(psutil.Error):
            for child in root.children(recursive=True):
                found[child.pid] = child
    return list(found.values())


def stop_cluster(temp_dirs: list[str], gcs_address: str) -> None:
    """Stop only this cluster's processes (`ray stop` would kill every Ray instance on the machine)."""
    import psutil

    victims = {proc.pid: proc for proc in cluster_processes(temp_dirs, gcs_address)}
    for proc in victims.values():
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    # A throwaway cluster: a few seconds to exit cleanly, then SIGKILL (some Ray processes outwait any grace).
    _, alive = psutil.wait_procs(list(victims.values()), timeout=3)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


@dataclass
class MlflowServer:
    uri: str
    root: Path
    process: subprocess.Popen


@pytest.fixture(scope="module")
def mlflow_process(tmp_path_factory) -> MlflowServer:
    """A real ``mlflow server`` (sqlite backend, served artifacts) on a free loopback port, launched but not
    waited for. Tests use :func:`mlflow_server`; a fixture that also starts the Ray cluster asks for this one
    first, so that the server boots while ``ray start`` runs."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115
    # Without MLflow's job runner (eight more processes, for GenAI jobs that mcl does not use).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield MlflowServer(f"http://127.0.0.1:{port}", root, proc)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def mlflow_server(mlflow_process: MlflowServer) -> MlflowServer:
    """The server of :func:`mlflow_process`, once ``/health`` answers."""
    log = mlflow_process.root / "server.log"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{mlflow_process.uri}/health", timeout=5) as r:
                if r.status == 200:
                    return mlflow_process
        except OSError:
            pass
        assert mlflow_process.process.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "mlflow server did not start: " + log.read_text()[-3000:]
        time.sleep(0.5)


@pytest.fixture
def local_ray():
    """A local Ray instance started by the code under test (none running before), shut down after."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield
    ray.shutdown()
