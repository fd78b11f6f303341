"""`ray job submit --working-dir . -- python jobs/run_stream.py` against a real local Ray cluster.

Starts `ray start --head` on free loopback ports (token auth on, as `ray start` sets it up), submits the
main job with a tiny config and checks it succeeds and ran the submitted copy of the engine, not the
checkout or an installed copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster(tmp_path):
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this venv's
    env["RAY_AUTH_MODE"] = "token"
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, client_port = _free_port(), _free_port(), _free_port()
    # Short: Ray's unix sockets live under it and socket paths are limited to ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="mclray-", dir="/tmp"))
    start = [
        str(bin_dir / "ray"), "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
        "--dashboard-host=127.0.0.1", "--num-cpus=4", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={_free_port()}",
        f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
    ]  # fmt: skip
    started = subprocess.run(start, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    try:
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        _stop_cluster(str(temp_dir), client_port)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_cluster(temp_dir: str, client_port: int) -> None:
    """Stop only this cluster's processes (`ray stop` would kill every Ray instance on the machine)."""
    import psutil

    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        args = " ".join(proc.info["cmdline"] or [])
        if temp_dir in args or f"--port={client_port} --mode=proxy" in args:
            roots.append(proc)
    victims = {p.pid: p for root in roots for p in [root, *_children(root)]}
    for proc in victims.values():
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(list(victims.values()), timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _children(proc):
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def test_job_submit_runs_the_submitted_code(ray_cluster, tmp_path, generated_root):
    env, address = ray_cluster
    cmd = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
        "--", "python", "jobs/run_stream.py",
        f"stream.root={generated_root}", "stream.options.tasks=[aerial]", "train.epochs=1",
        "eval.max_samples_per_task=4", f"tracking.output_dir={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out
    engine = next(line for line in out.splitlines() if line.startswith("mcl engine: "))
    assert "working_dir_files" in engine, engine  # the uploaded copy, not the checkout
    assert "CL metrics" in out and "accuracy matrix" in out
