"""The cluster files in ``clusters/``: Ray's own launcher validation, the layout they promise (a CPU head that
trains nothing, 8-GPU workers, MLflow on the head), the KubeRay manifest, and that the files agree with each
other and with the README. Pure file checks: no cluster, no cloud, no network.

Every check is a function returning a list of problems, run on the shipped files (no problems) and on broken
copies (problems found), so a check that could never fail is caught too.
"""

from __future__ import annotations

import ast
import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTERS = REPO / "clusters"
README = CLUSTERS / "README.md"
SWEEP = CLUSTERS / "sweep_llava7b.yaml"
KUBERAY = CLUSTERS / "kuberay-rayjob.yaml"
LAUNCHERS = {"aws": ("p5.48xlarge", "s3://"), "gcp": ("a3-highgpu-8g", "gs://")}

Problems = list[str]


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _launcher(cloud: str) -> dict[str, Any]:
    return _load(CLUSTERS / f"{cloud}.yaml")


def _kuberay_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(KUBERAY.read_text()) if d is not None]


def _commands(config: dict[str, Any], key: str) -> list[str]:
    return [str(c) for c in config.get(key) or []]


# ------------------------------------------------------------------------------------------ the checks


def ray_validation_problems(config: dict[str, Any]) -> Problems:
    """The file against Ray's schema (``ray/autoscaler/ray-schema.json``), then what `ray up` checks before
    it touches the cloud: Ray's defaults filled in, the schema again and Ray's cross-field rules (head type,
    min/max workers), with Ray's own functions."""
    import json

    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    try:
        jsonschema.validate(config, schema)
        validate_config(prepare_config(copy.deepcopy(config)))
    except (jsonschema.ValidationError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        return [f"{type(exc).__name__}: {str(exc).splitlines()[0]}"]
    return []


def _gpu_worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    types = config.get("available_node_types", {})
    return {name: t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0}


def layout_problems(config: dict[str, Any], instance_type: str) -> Problems:
    """One CPU head that advertises no CPU (nothing Ray schedules runs there) and one autoscaled 8-GPU
    worker type of the expected instance type."""
    problems = []
    types = config.get("available_node_types", {})
    head = config.get("head_node_type")
    if head not in types:
        return [f"head_node_type {head!r} is not one of available_node_types {sorted(types)}"]
    head_resources = types[head].get("resources", {})
    if head_resources.get("CPU") != 0 or head_resources.get("GPU", 0) != 0:
        problems.append(f"head type {head!r} must advertise CPU 0 and no GPU, got {head_resources}")
    if types[head].get("max_workers", 0) != 0:
        problems.append(f"head type {head!r} must not be launched as a worker")
    workers = {name: t for name, t in types.items() if name != head}
    gpu = _gpu_worker_types(config)
    if len(workers) != 1 or set(gpu) != set(workers):
        problems.append(
            f"expected exactly one worker type, with GPUs; got {sorted(workers)} (GPU: {sorted(gpu)})"
        )
    for name, node_type in gpu.items():
        if node_type["resources"]["GPU"] != 8:
            problems.append(f"{name}: resources must hold 8 GPUs, got {node_type['resources']}")
        if node_type.get("min_workers", 0) != 0:
            problems.append(f"{name}: min_workers must be 0 (no GPU cost while idle)")
        if not 1 <= node_type.get("max_workers", 0) <= config.get("max_workers", 0):
            problems.append(f"{name}: max_workers must be within 1..{config.get('max_workers')}")
        node_config = node_type.get("node_config", {})
        if instance_type not in (node_config.get("InstanceType"), node_config.get("machineType")):
            problems.append(f"{name}: expected instance type {instance_type}, got {node_config}")
    return problems


def _mlflow_port(command: str) -> int | None:
    match = re.search(r"--port[ =](\d+)", command)
    return int(match.group(1)) if match else None


def _uri_ports(text: str, key: str) -> list[int]:
    return [int(p) for p in re.findall(rf"{re.escape(key)}=http://[^\s:/]+:(\d+)", text)]


def mlflow_problems(config: dict[str, Any], artifact_scheme: str) -> Problems:
    """The head starts an MLflow server reachable from the workers, and every node's tracking URI points at
    its port."""
    head_cmds = _commands(config, "head_start_ray_commands")
    servers = [c for c in head_cmds if "mlflow server" in c]
    if len(servers) != 1:
        return [f"expected one `mlflow server` in head_start_ray_commands, found {len(servers)}"]
    server = servers[0]
    problems = []
    port = _mlflow_port(server)
    if port is None:
        problems.append("the MLflow server has no --port")
    if not re.search(r"--host[ =]0\.0\.0\.0", server):
        problems.append("the MLflow server must listen on 0.0.0.0 (trials on workers reach it)")
    if not re.search(r"--backend-store-uri[ =]sqlite:////\S+\.db", server):
        problems.append("the MLflow backend store must be an absolute sqlite path on the head")
    if not re.search(rf"--artifacts-destination[ =]{re.escape(artifact_scheme)}\S+", server):
        problems.append(f"MLflow artifacts must go to {artifact_scheme}...")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        ray_start = [c for c in _commands(config, key) if "ray start" in c]
        ports = [p for c in ray_start for p in _uri_ports(c, "MLFLOW_TRACKING_URI")]
        if not ray_start or not ports or set(ports) != {port}:
            problems.append(f"{key}: `ray start` must export MLFLOW_TRACKING_URI on port {port}, got {ports}")
    return problems


def install_problems(config: dict[str, Any]) -> Problems:
    """The repository is synced to every node and installed there, in the environment `ray start` uses."""
    problems = []
    mounts = config.get("file_mounts", {})
    if mounts.get("~/mcl") != ".":
        problems.append(f"file_mounts must sync the repository ('.') to ~/mcl, got {mounts}")
    setup = _commands(config, "setup_commands")
    if not any(re.search(r"pip install .*-e ~/mcl\b", c) for c in setup):
        problems.append("setup_commands must `pip install -e ~/mcl`")
    if not any("activate" in c and "~/.bashrc" in c for c in setup):
        problems.append("setup_commands must activate the environment for later commands (~/.bashrc)")
    return problems


def _build_stream_calls(text: str) -> list[tuple[str, str, dict[str, Any]]]:
    pattern = r"build_stream\(\s*'([^']+)',\s*'([^']+)',\s*(\{[^}]*\})\s*\)"
    return [(name, root, ast.literal_eval(options)) for name, root, options in re.findall(pattern, text)]


def stream_setup_problems(sweep: dict[str, Any], text: str, where: str) -> Problems:
    """Every stream of the sweep is generated by ``text`` (a node's setup, an image build) at the same path
    with the same options, so Ray Data tasks on any node find the images the driver lists."""
    calls = _build_stream_calls(text)
    problems = []
    for stream in sweep["streams"]:
        wanted = (stream["name"], stream.get("root", ""), stream.get("options", {}))
        if wanted not in calls:
            problems.append(f"{where}: no build_stream{wanted} (found {calls})")
    return problems


def _containers(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, container) for every container of a Deployment or RayJob."""
    if doc.get("kind") == "Deployment":
        pods = [("Deployment", doc["spec"]["template"])]
    elif doc.get("kind") == "RayJob":
        cluster = doc["spec"].get("rayClusterSpec", {})
        pods = [("headGroupSpec", cluster.get("headGroupSpec", {}).get("template", {}))]
        pods += [
            (f"workerGroupSpecs[{g.get('groupName')}]", g.get("template", {}))
            for g in cluster.get("workerGroupSpecs", [])
        ]
    else:
        return []
    return [(where, c) for where, pod in pods for c in pod.get("spec", {}).get("containers", [])]


def _rayjob_problems(job: dict[str, Any]) -> Problems:
    """A CPU-only head, 8-GPU workers, and an entrypoint running jobs/sweep.py on a config that exists."""
    problems = []
    spec = job["spec"]
    head = spec.get("rayClusterSpec", {}).get("headGroupSpec")
    if not head:
        problems.append("rayClusterSpec has no headGroupSpec")
    elif str(head.get("rayStartParams", {}).get("num-cpus")) != "0":
        problems.append("the head must start with num-cpus 0 (nothing Ray schedules runs there)")
    if not spec.get("rayClusterSpec", {}).get("workerGroupSpecs"):
        problems.append("rayClusterSpec has no workerGroupSpecs")
    for where, container in _containers(job):
        gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        if where.startswith("head") and gpus:
            problems.append("the head container must not ask for GPUs")
        if where.startswith("worker") and gpus != 8:
            problems.append(f"{where}: limits must hold nvidia.com/gpu 8, got {gpus}")
    entrypoint = str(spec.get("entrypoint", ""))
    config = re.search(r"python jobs/sweep\.py .*--config[ =](\S+)", entrypoint)
    if not config:
        problems.append(f"the entrypoint must run `python jobs/sweep.py --config ...`, got {entrypoint!r}")
    elif not (REPO / config.group(1)).is_file():
        problems.append(f"the entrypoint's --config {config.group(1)} does not exist in the repository")
    if not (yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}).get("working_dir"):
        problems.append("runtimeEnvYAML must set working_dir (the code the job runs)")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("spec.shutdownAfterJobFinishes must be true (GPU nodes are released after the sweep)")
    return problems


def _tracking_problems(job: dict[str, Any], by_kind: dict[str, list[dict[str, Any]]]) -> Problems:
    """The job's tracking.uri names a Service of the manifest, on a port an MLflow server listens on."""
    uri = re.search(r"tracking\.uri=http://([^\s:/]+):(\d+)", str(job["spec"].get("entrypoint", "")))
    if not uri:
        return ["the entrypoint must pass tracking.uri=http://<mlflow service>:<port>"]
    host, port = uri.group(1), int(uri.group(2))
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    if host not in services:
        return [f"tracking.uri host {host!r} is not a Service of the manifest ({sorted(services)})"]
    problems = []
    if port not in {p["port"] for p in services[host]["spec"].get("ports", [])}:
        problems.append(f"tracking.uri port {port} is not a port of Service {host}")
    servers = [
        " ".join(c["command"])
        for d in by_kind.get("Deployment", [])
        for _, c in _containers(d)
        if c.get("command", [])[:2] == ["mlflow", "server"]
    ]
    if {_mlflow_port(s) for s in servers} != {port}:
        problems.append(f"no MLflow server Deployment listening on {port} (found {servers})")
    return problems


def kuberay_problems(docs: list[dict[str, Any]]) -> Problems:
    """A RayJob (ray.io/v1) with a CPU-only head and 8-GPU workers running jobs/sweep.py, an MLflow
    Deployment + Service on the port the job logs to, and image + resources on every container."""
    problems = []
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        if not doc.get("apiVersion") or not doc.get("kind") or not doc.get("metadata", {}).get("name"):
            problems.append(f"document without apiVersion, kind or metadata.name: {str(doc)[:80]}")
        by_kind.setdefault(doc.get("kind", ""), []).append(doc)
    jobs = by_kind.get("RayJob", [])
    if len(jobs) != 1 or jobs[0].get("apiVersion") != "ray.io/v1":
        return problems + [
            f"expected one RayJob of apiVersion ray.io/v1, got {[j.get('apiVersion') for j in jobs]}"
        ]
    problems += _rayjob_problems(jobs[0]) + _tracking_problems(jobs[0], by_kind)
    for doc in docs:
        for where, container in _containers(doc):
            name = f"{doc['kind']} {where} container {container.get('name')!r}"
            resources = container.get("resources", {})
            if not container.get("image"):
                problems.append(f"{name} has no image")
            if not resources.get("requests") or not resources.get("limits"):
                problems.append(f"{name} must set resources.requests and resources.limits")
    return problems


# ------------------------------------------------------------------------------------------ shipped files


def test_every_yaml_under_clusters_parses():
    paths = sorted(CLUSTERS.rglob("*.yaml")) + sorted(CLUSTERS.rglob("*.yml"))
    assert {p.name for p in paths} >= {"aws.yaml", "gcp.yaml", "kuberay-rayjob.yaml", "sweep_llava7b.yaml"}
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_config_passes_rays_validation(cloud):
    assert ray_validation_problems(_launcher(cloud)) == []


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_layout_cpu_head_and_8_gpu_workers(cloud):
    assert layout_problems(_launcher(cloud), LAUNCHERS[cloud][0]) == []


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_starts_mlflow_on_the_head_and_points_every_node_at_it(cloud):
    assert mlflow_problems(_launcher(cloud), LAUNCHERS[cloud][1]) == []


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_installs_mcl_on_every_node(cloud):
    assert install_problems(_launcher(cloud)) == []


def test_tracking_uris_in_readme_and_commands_use_the_mlflow_port():
    ports = {
        _mlflow_port(c)
        for cloud in LAUNCHERS
        for c in _commands(_launcher(cloud), "head_start_ray_commands")
        if "mlflow server" in c
    }
    assert len(ports) == 1
    texts = [README.read_text(), KUBERAY.read_text(), SWEEP.read_text()]
    texts += [(CLUSTERS / f"{cloud}.yaml").read_text() for cloud in LAUNCHERS]
    used = [
        p
        for text in texts
        for p in _uri_ports(text, "tracking.uri") + _uri_ports(text, "MLFLOW_TRACKING_URI")
    ]
    assert used and set(used) == ports


def test_generated_stream_is_built_where_and_how_the_sweep_reads_it():
    sweep = _load(SWEEP)
    texts = {f"{cloud}.yaml": (CLUSTERS / f"{cloud}.yaml").read_text() for cloud in LAUNCHERS}
    texts["README.md (image build)"] = README.read_text()
    for where, text in texts.items():
        assert stream_setup_problems(sweep, text, where) == []


def test_concurrency_matches_the_gpu_nodes_available():
    """One trial per 8-GPU node: the sweep's concurrency equals every cluster's GPU-node maximum (it must be
    explicit, as the sweep sizes 'auto' concurrency from a cluster that starts with no GPU node)."""
    concurrency = _load(SWEEP)["max_concurrent_trials"]
    maxima = [t["max_workers"] for cloud in LAUNCHERS for t in _gpu_worker_types(_launcher(cloud)).values()]
    job = next(d for d in _kuberay_docs() if d["kind"] == "RayJob")
    maxima += [g["maxReplicas"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    assert concurrency >= 1 and set(maxima) == {concurrency}
    scaling = _load(SWEEP)["overrides"]
    assert scaling["scaling.num_workers"] == 8 and scaling["scaling.use_gpu"] is True


def test_kuberay_manifest():
    docs = _kuberay_docs()
    assert {d["kind"] for d in docs} >= {"RayJob", "Deployment", "Service"}
    assert kuberay_problems(docs) == []


def test_placeholders_are_only_the_documented_ones():
    """Values a user must fill in are spelled `<...>`; the README's list names every one of them."""
    readme = README.read_text()
    for path in sorted(CLUSTERS.glob("*.yaml")):
        for placeholder in set(re.findall(r"<[a-z][a-z0-9-]*>", path.read_text())):
            assert placeholder in readme, f"{path.name}: {placeholder} is not explained in clusters/README.md"


# ------------------------------------------------------------------------------------------ broken copies


def _break(cloud: str, change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    config = _launcher(cloud)
    change(config)
    return config


def _head(config: dict[str, Any]) -> dict[str, Any]:
    return config["available_node_types"][config["head_node_type"]]


def _gpu(config: dict[str, Any]) -> dict[str, Any]:
    return next(iter(_gpu_worker_types(config).values()))


RAY_BREAKS = {
    "unknown top-level key": lambda c: c.update(setup_comands=["true"]),
    "unknown node-type key": lambda c: _gpu(c).update(instance_type="p5.48xlarge"),
    "head type missing": lambda c: c["available_node_types"].pop(c["head_node_type"]),
    "no head_node_type": lambda c: c.pop("head_node_type"),
    "fractional GPU count": lambda c: _gpu(c)["resources"].update(GPU=0.5),
    "min_workers above max_workers": lambda c: c.update(max_workers=0) or _gpu(c).update(min_workers=2),
    "commands not a list": lambda c: c.update(setup_commands="pip install -e ~/mcl"),
}


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
@pytest.mark.parametrize("broken", sorted(RAY_BREAKS))
def test_rays_validation_rejects_broken_launcher_configs(cloud, broken):
    assert ray_validation_problems(_break(cloud, RAY_BREAKS[broken]))


LAYOUT_BREAKS = {
    "head runs trials": lambda c: _head(c)["resources"].update(CPU=16),
    "4-GPU workers": lambda c: _gpu(c)["resources"].update(GPU=4),
    "workers always on": lambda c: _gpu(c).update(min_workers=1),
    "second worker type": lambda c: c["available_node_types"].update(
        cpu={"resources": {"CPU": 8}, "node_config": {}}
    ),
    "unknown head type": lambda c: c.update(head_node_type="nope"),
}


@pytest.mark.parametrize("broken", sorted(LAYOUT_BREAKS))
def test_layout_check_rejects_broken_layouts(broken):
    assert layout_problems(_break("aws", LAYOUT_BREAKS[broken]), "p5.48xlarge")


def _replace_in(key: str, old: str, new: str) -> Callable[[dict[str, Any]], None]:
    return lambda c: c.update({key: [str(x).replace(old, new) for x in c[key]]})


MLFLOW_BREAKS = {
    "no server": _replace_in("head_start_ray_commands", "mlflow server", "mlflow ui"),
    "port mismatch": _replace_in("head_start_ray_commands", "--port 5000", "--port 5001"),
    "localhost only": _replace_in("head_start_ray_commands", "--host 0.0.0.0", "--host 127.0.0.1"),
    "workers not pointed at it": _replace_in("worker_start_ray_commands", "MLFLOW_TRACKING_URI", "X"),
    "local artifacts": _replace_in("head_start_ray_commands", "s3://", "/tmp/"),
}


@pytest.mark.parametrize("broken", sorted(MLFLOW_BREAKS))
def test_mlflow_check_rejects_broken_commands(broken):
    assert mlflow_problems(_break("aws", MLFLOW_BREAKS[broken]), "s3://")


INSTALL_BREAKS = {
    "repo not synced": lambda c: c["file_mounts"].pop("~/mcl"),
    "no install": _replace_in("setup_commands", "-e ~/mcl", "ray[default]"),
    "no environment": _replace_in("setup_commands", "activate", "true"),
}


@pytest.mark.parametrize("broken", sorted(INSTALL_BREAKS))
def test_install_check_rejects_broken_setup(broken):
    assert install_problems(_break("gcp", INSTALL_BREAKS[broken]))


def test_stream_check_rejects_other_options_or_root():
    sweep = _load(SWEEP)
    text = (CLUSTERS / "aws.yaml").read_text()
    assert stream_setup_problems(sweep, text.replace("'test_per_task': 200", "'test_per_task': 40"), "x")
    assert stream_setup_problems(sweep, text.replace("/opt/mcl/data/generated", "/tmp/generated"), "x")
    assert stream_setup_problems(sweep, "no stream here", "x")


def _job(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "RayJob")["spec"]


def _worker(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _job(docs)["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def _entrypoint(old: str, new: str) -> Callable[[list[dict[str, Any]]], None]:
    return lambda docs: _job(docs).update(entrypoint=_job(docs)["entrypoint"].replace(old, new))


KUBERAY_BREAKS = {
    "no GPU limit": lambda docs: _worker(docs)["resources"]["limits"].pop("nvidia.com/gpu"),
    "no resources": lambda docs: _worker(docs).pop("resources"),
    "no image": lambda docs: _worker(docs).pop("image"),
    "no head group": lambda docs: _job(docs)["rayClusterSpec"].pop("headGroupSpec"),
    "head takes trials": lambda docs: _job(docs)["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].pop(
        "num-cpus"
    ),
    "missing config": _entrypoint("clusters/sweep_llava7b.yaml", "clusters/nope.yaml"),
    "another script": _entrypoint("jobs/sweep.py", "jobs/run_stream.py"),
    "unknown mlflow host": _entrypoint("http://mlflow:", "http://tracking:"),
    "wrong mlflow port": _entrypoint("http://mlflow:5000", "http://mlflow:5001"),
    "no working_dir": lambda docs: _job(docs).update(runtimeEnvYAML="env_vars: {}\n"),
    "cluster kept": lambda docs: _job(docs).pop("shutdownAfterJobFinishes"),
    "no mlflow server": lambda docs: next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"][
        "spec"
    ]["containers"][0].update(command=["sleep", "infinity"]),
    "old api": lambda docs: next(d for d in docs if d["kind"] == "RayJob").update(
        apiVersion="ray.io/v1alpha1"
    ),
}


@pytest.mark.parametrize("broken", sorted(KUBERAY_BREAKS))
def test_kuberay_check_rejects_broken_manifests(broken):
    docs = _kuberay_docs()
    KUBERAY_BREAKS[broken](docs)
    assert kuberay_problems(docs)
