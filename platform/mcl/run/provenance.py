"""Provenance of a run: what it ran with, recorded as MLflow tags ``mcl.provenance.<key>``.

Collectors, each cheap and side-effect free:

- :func:`versions`: torch, transformers, peft, deepspeed, ray, mlflow, mcl and Python (``absent`` if missing);
- :func:`hardware`: this machine's CPU model and count, memory, GPU model and count;
- :func:`ray_cluster`: the Ray cluster's alive nodes and their CPUs, GPUs and memory (when Ray is initialised);
- :func:`code_identity`: the git commit and a dirty flag of mcl's source tree when it is a git checkout, else a
  sha256 of its source files (e.g. the working dir a ``ray job submit`` shipped);
- :func:`config_sha256`: the resolved config's hash, less where the run is recorded (:data:`PLACE_FIELDS`);
- :func:`data_identity`: the hash of the data manifest the run was checked against, else of the stream's
  annotation files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from mcl.config import ExperimentConfig

PREFIX = "mcl.provenance."
PACKAGES = ("torch", "transformers", "peft", "deepspeed", "ray", "mlflow", "mcl")
# Where a run is recorded and run from: a reproduction of a run changes these and is still the same run.
PLACE_FIELDS = (
    "tracking.uri",
    "tracking.experiment",
    "tracking.output_dir",
    "tracking.run_name",
    "scaling.ray_address",
)
SOURCE_SUFFIXES = (".py", ".yaml", ".yml", ".toml", ".cfg")
_SKIP_DIRS = {"__pycache__", "node_modules", "mcl_runs", "mlruns", "mlartifacts", "test-artifacts"}


def versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on, and Python's."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what :mod:`platform` says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def memory_gb() -> float:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, ValueError, OSError):
        return 0.0


def hardware() -> dict[str, Any]:
    """This machine: CPU model and count, memory (GiB), GPU model and count as torch sees them."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {
        "host": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count() or 0,
        "memory_gb": memory_gb(),
        "gpu_count": gpus,
        "gpu_model": torch.cuda.get_device_name(0) if gpus else "none",
    }


def ray_cluster() -> dict[str, Any]:
    """The Ray cluster this process is connected to: alive node count and, per node, CPUs, GPUs, memory (GiB)
    and accelerator type; empty when Ray is not initialised (nothing is started here)."""
    if "ray" not in sys.modules:
        return {}
    import ray

    if not ray.is_initialized():
        return {}
    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        accel = sorted(k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:"))
        nodes.append(
            {
                "cpus": res.get("CPU", 0.0),
                "gpus": res.get("GPU", 0.0),
                "memory_gb": round(res.get("memory", 0.0) / 2**30, 1),
                **({"accelerator": ",".join(accel)} if accel else {}),
            }
        )
    return {"ray_nodes": len(nodes), "ray_node_resources": nodes}


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def source_files(root: Path) -> list[Path]:
    """The source files under ``root`` (:data:`SOURCE_SUFFIXES`), hidden and generated folders left out."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(SOURCE_SUFFIXES)]
    return files


def source_sha256(root: Path) -> tuple[str, int]:
    """A sha256 over the relative paths and contents of ``root``'s source files, and their count."""
    digest = hashlib.sha256()
    files = source_files(root)
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest(), len(files)


def code_root() -> Path:
    """The folder holding ``platform/mcl``: a checkout, or the working dir a Ray job was submitted with."""
    import mcl

    return Path(mcl.__file__).resolve().parents[2]


def code_identity(root: Path | None = None) -> dict[str, Any]:
    """``{"code_commit", "code_dirty"[, "code_diff_sha256"]}`` when ``root`` (default: :func:`code_root`) is a
    git checkout whose files git tracks, else ``{"code_sha256", "code_files"}``."""
    base = root or code_root()
    top = _git(base, "rev-parse", "--show-toplevel")
    tracked = top is not None and _git(base, "ls-files", "--error-unmatch", "--", ".") is not None
    commit = _git(base, "rev-parse", "HEAD") if tracked else None
    if commit:
        status = _git(base, "status", "--porcelain") or ""
        identity: dict[str, Any] = {"code_commit": commit.strip(), "code_dirty": bool(status.strip())}
        if status.strip():
            diff = _git(base, "diff", "HEAD") or ""
            identity["code_diff_sha256"] = hashlib.sha256((diff + status).encode()).hexdigest()
        return identity
    digest, count = source_sha256(base)
    return {"code_sha256": digest, "code_files": count}


def config_sha256(cfg: ExperimentConfig | dict[str, Any]) -> str:
    """sha256 of the resolved config as canonical JSON, less :data:`PLACE_FIELDS` (where it is recorded)."""
    flat = cfg.flat() if isinstance(cfg, ExperimentConfig) else dict(cfg)
    kept = {k: v for k, v in flat.items() if k not in PLACE_FIELDS}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def data_identity(root: str | Path, manifest_sha256: str = "") -> dict[str, str]:
    """The data a run read: the hash of the manifest it matched, else of the annotation files under ``root``."""
    if manifest_sha256:
        return {"data_manifest_sha256": manifest_sha256}
    from mcl.streams.manifest import annotations_sha256

    return {"data_annotations_sha256": annotations_sha256(root)}


def as_tags(values: dict[str, Any]) -> dict[str, str]:
    """``{mcl.provenance.<key>: text}``; lists and dicts as JSON, cut to MLflow's tag length."""
    tags = {}
    for key, value in values.items():
        text = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else str(value)
        tags[PREFIX + key] = text[:8000]
    return tags


def environment_tags() -> dict[str, str]:
    """Versions, this machine's hardware, the Ray cluster (if connected) and the code identity, as tags."""
    found: dict[str, Any] = {f"version.{k}": v for k, v in versions().items()}
    return as_tags({**found, **hardware(), **ray_cluster(), **code_identity()})


def run_tags(cfg: ExperimentConfig, manifest_sha256: str = "") -> dict[str, str]:
    """Everything above plus the config hash and the data identity of one run."""
    run = {"config_sha256": config_sha256(cfg), **data_identity(cfg.stream.root, manifest_sha256)}
    return {**environment_tags(), **as_tags(run)}


def executor_tag(executor: Any) -> dict[str, str]:
    """``mcl.provenance.executor``: what trained the phases (the executor factory's qualified name)."""
    name = (
        f"{getattr(executor, '__module__', '')}.{getattr(executor, '__qualname__', type(executor).__name__)}"
    )
    return {PREFIX + "executor": name}


def sweep_provenance(sweep_flat: dict[str, Any]) -> dict[str, str]:
    """A sweep's run: the environment tags and the hash of the sweep's config (its trials carry their own)."""
    return {**environment_tags(), **as_tags({"config_sha256": config_sha256(sweep_flat)})}
