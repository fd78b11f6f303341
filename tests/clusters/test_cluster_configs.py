"""The cluster files in ``clusters/``: Ray's own launcher validation, the layout they promise (a CPU head that
trains nothing, 8-GPU workers, MLflow on the head, a shared filesystem at the same path on every node that
holds the sweep's ``storage``), the KubeRay manifest, and that the files agree with each other and with the
README. Pure file checks: no cluster, no cloud, no network.

Every check is a function returning a list of problems, run on the shipped files (no problems) and on broken
copies (problems found), so a check that could never fail is caught too.
"""

from __future__ import annotations

import ast
import copy
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTERS = REPO / "clusters"
README = CLUSTERS / "README.md"
SWEEP = CLUSTERS / "sweep_llava7b.yaml"
KUBERAY = CLUSTERS / "kuberay-rayjob.yaml"
LAUNCHERS = {"aws": ("p5.48xlarge", "s3://"), "gcp": ("a3-highgpu-8g", "gs://")}
# Where every node (VM or pod) sees the shared filesystem; the sweep's `storage` must lie under it.
SHARED_MOUNT = "/mnt/mcl"

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


def storage_problems(value: Any, where: str) -> Problems:
    """``storage`` is an absolute folder under the shared mount, the one path every node sees. An object-store
    URI (mcl does not take one for ``storage``) or a folder off the mount (each node would have its own) is
    a problem."""
    if not isinstance(value, str) or not value:
        return [f"{where}: storage must be a folder, got {value!r}"]
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
        return [
            f"{where}: storage {value!r} is a URI; it must be a folder under {SHARED_MOUNT} (shared by all nodes)"
        ]
    path, mount = PurePosixPath(value), PurePosixPath(SHARED_MOUNT)
    if not path.is_absolute() or ".." in path.parts or mount not in path.parents:
        return [
            f"{where}: storage {value!r} must be an absolute folder under {SHARED_MOUNT} (shared by all nodes)"
        ]
    return []


def _storage_overrides(text: str) -> list[str]:
    """The values of every ``storage=...`` override written in ``text`` (commands, entrypoints, prose)."""
    return re.findall(r"\bstorage=([^\s`'\"]+)", text)


def _node_setup(config: dict[str, Any], node_type: str) -> list[str]:
    """The setup commands Ray runs on a node of ``node_type``: the shared ones, then the head's or the
    workers' (a node type's own ``worker_setup_commands`` replace the global ones)."""
    types = config.get("available_node_types", {})
    if node_type == config.get("head_node_type"):
        own = _commands(config, "head_setup_commands")
    elif "worker_setup_commands" in types.get(node_type, {}):
        own = _commands(types[node_type], "worker_setup_commands")
    else:
        own = _commands(config, "worker_setup_commands")
    return _commands(config, "setup_commands") + own


def _first(commands: list[str], pattern: str) -> int | None:
    return next((i for i, c in enumerate(commands) if re.search(pattern, c)), None)


# `mountpoint -q /mnt/mcl || ... mount ... /mnt/mcl`: mounts once, a no-op when the filesystem is there.
_GUARDED_MOUNT = rf"mountpoint -q {SHARED_MOUNT}\s*\|\|[^;&]*\bmount\b[^;&]*\s{SHARED_MOUNT}(\s|$)"
_FSTAB_ENTRY = rf"([^\s'\"]+):(/\S*)\s+{SHARED_MOUNT}\s+(nfs4?)\s+(\S+)\s+0\s+0"


def _fstab_problems(config: dict[str, Any], cloud: str) -> Problems:
    """The NFS entry for the shared mount in /etc/fstab, appended once; on AWS an EFS of the cluster's region
    mounted with NFS 4.1."""
    setup = _commands(config, "setup_commands")
    at = _first(setup, r"/etc/fstab")
    entry = re.search(_FSTAB_ENTRY, setup[at]) if at is not None else None
    if entry is None:
        return [
            f"setup_commands must add an NFS entry for {SHARED_MOUNT} to /etc/fstab (so a restarted node "
            "mounts it again)"
        ]
    server, fs_type, options = entry.group(1), entry.group(3), entry.group(4).split(",")
    problems = []
    if not re.search(r"grep -q[^|;&]*/etc/fstab\s*\|\|", setup[at]):
        problems.append("the /etc/fstab entry must be guarded (`grep -q ... /etc/fstab ||`): appended once")
    if "_netdev" not in options:
        problems.append(f"the /etc/fstab entry needs _netdev (mount after the network), got {options}")
    if cloud == "aws":
        region = config.get("provider", {}).get("region")
        if not server.endswith(f".efs.{region}.amazonaws.com"):
            problems.append(f"the EFS server {server!r} must be an EFS of provider.region {region!r}")
        if fs_type != "nfs4" or "nfsvers=4.1" not in options:
            problems.append(f"EFS is mounted as nfs4 with nfsvers=4.1, got {fs_type} {options}")
    return problems


def shared_mount_problems(config: dict[str, Any], cloud: str, storage: str) -> Problems:
    """Every node type mounts the shared filesystem at SHARED_MOUNT in its setup (from /etc/fstab, once), the
    start commands mount it again before `ray start` (a restarted stopped node skips the setup commands), and
    the sweep's ``storage`` folder is created there, owned by the user Ray runs as."""
    problems = _fstab_problems(config, cloud)
    fstab_at = _first(_commands(config, "setup_commands"), r"/etc/fstab")
    for node_type in config.get("available_node_types", {}):
        setup = _node_setup(config, node_type)
        mount_at = _first(setup, _GUARDED_MOUNT)
        if mount_at is None:
            unguarded = _first(setup, rf"\bmount\b[^;&|]*\s{SHARED_MOUNT}(\s|$)")
            why = "guarded by `mountpoint -q`" if unguarded is not None else "missing"
            problems.append(f"{node_type}: the setup must mount {SHARED_MOUNT} ({why})")
            continue
        if fstab_at is not None and mount_at < fstab_at:
            problems.append(f"{node_type}: {SHARED_MOUNT} is mounted before its /etc/fstab entry exists")
        store = re.escape(storage)
        if _first(setup[mount_at:], rf"mkdir -p {store}(\s|$).*chown [^;&|]*\s{store}(\s|$)") is None:
            problems.append(f"{node_type}: the setup must create {storage} after the mount and chown it")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = _commands(config, key)
        mount_at, ray_at = _first(start, _GUARDED_MOUNT), _first(start, r"\bray start\b")
        if mount_at is None or ray_at is None or mount_at > ray_at:
            problems.append(f"{key}: must mount {SHARED_MOUNT} (guarded) before `ray start`")
    return problems


def _ray_pods(job: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod template) for the head group and every worker group of a RayJob."""
    cluster = job["spec"].get("rayClusterSpec", {})
    pods = [("headGroupSpec", cluster.get("headGroupSpec", {}).get("template", {}))]
    pods += [
        (f"workerGroupSpecs[{g.get('groupName')}]", g.get("template", {}))
        for g in cluster.get("workerGroupSpecs", [])
    ]
    return pods


def _containers(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, container) for every container of a Deployment or RayJob."""
    if doc.get("kind") == "Deployment":
        pods = [("Deployment", doc["spec"]["template"])]
    elif doc.get("kind") == "RayJob":
        pods = _ray_pods(doc)
    else:
        return []
    return [(where, c) for where, pod in pods for c in pod.get("spec", {}).get("containers", [])]


def shared_volume_problems(job: dict[str, Any], by_kind: dict[str, list[dict[str, Any]]]) -> Problems:
    """Every Ray container mounts one ReadWriteMany PersistentVolumeClaim of the manifest at SHARED_MOUNT, and
    the entrypoint's ``storage`` lies under it."""
    stores = _storage_overrides(str(job["spec"].get("entrypoint", "")))
    problems = [] if stores else ["the entrypoint must pass storage=<folder under the shared mount>"]
    problems += [p for value in stores for p in storage_problems(value, "RayJob entrypoint")]
    claims = {c["metadata"]["name"]: c for c in by_kind.get("PersistentVolumeClaim", [])}
    for where, pod in _ray_pods(job):
        spec = pod.get("spec", {})
        volumes = {
            v.get("name"): v.get("persistentVolumeClaim", {}).get("claimName")
            for v in spec.get("volumes", [])
        }
        for container in spec.get("containers", []):
            mounted = [
                m["name"] for m in container.get("volumeMounts", []) if m.get("mountPath") == SHARED_MOUNT
            ]
            claim = volumes.get(mounted[0]) if mounted else None
            if claim is None:
                problems.append(
                    f"{where}: container {container.get('name')!r} mounts no claim at {SHARED_MOUNT}"
                )
            elif claim not in claims:
                problems.append(f"{where}: claim {claim!r} is not a PersistentVolumeClaim of the manifest")
            elif "ReadWriteMany" not in claims[claim]["spec"].get("accessModes", []):
                problems.append(f"{where}: claim {claim!r} must be ReadWriteMany (every Ray pod mounts it)")
    return problems


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
    problems += shared_volume_problems(jobs[0], by_kind)
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


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_mounts_the_shared_filesystem_on_every_node(cloud):
    assert shared_mount_problems(_launcher(cloud), cloud, _load(SWEEP)["storage"]) == []


def test_every_storage_is_a_folder_on_the_shared_mount():
    """The sweep file's ``storage`` and every ``storage=`` override in the commands of the cluster files and
    the README: each file spells at least one, so the check cannot pass by finding none."""
    problems = storage_problems(_load(SWEEP)["storage"], "sweep_llava7b.yaml")
    texts = {path.name: path.read_text() for path in [README, KUBERAY, SWEEP]}
    texts.update({f"{cloud}.yaml": (CLUSTERS / f"{cloud}.yaml").read_text() for cloud in LAUNCHERS})
    for name, text in texts.items():
        values = _storage_overrides(text)
        assert values, f"{name} passes no storage= override"
        problems += [p for value in values for p in storage_problems(value, name)]
    assert problems == []


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


@pytest.mark.parametrize(
    "storage",
    [
        "s3://my-bucket/mcl-sweeps",
        "gs://my-bucket/x",
        "mcl_sweeps",
        "/tmp/mcl-sweeps",
        "/mnt/mclx/sweeps",
        "/mnt/mcl/../tmp/sweeps",
        "",
        None,
    ],
)
def test_storage_check_rejects_uris_and_folders_off_the_mount(storage):
    assert storage_problems(storage, "x")


def test_storage_check_finds_a_uri_in_a_command():
    text = README.read_text().replace("storage=/mnt/mcl/sweeps", "storage=s3://my-bucket/mcl-sweeps", 1)
    problems = [p for value in _storage_overrides(text) for p in storage_problems(value, "README.md")]
    assert len(problems) == 1 and "s3://my-bucket/mcl-sweeps" in problems[0]


def _drop(key: str, pattern: str) -> Callable[[dict[str, Any]], None]:
    return lambda c: c.update({key: [x for x in _commands(c, key) if not re.search(pattern, x)]})


_MOUNT_AND_STORAGE = r"sudo mount|mkdir -p /mnt/mcl/sweeps"


def _move_mount(config: dict[str, Any], to: tuple[str, ...]) -> None:
    """Move the mount and the storage folder's creation from setup_commands to the start of each of ``to``."""
    moved = [c for c in _commands(config, "setup_commands") if re.search(_MOUNT_AND_STORAGE, c)]
    _drop("setup_commands", _MOUNT_AND_STORAGE)(config)
    for key in to:
        config[key] = moved + _commands(config, key)


def _own_worker_setup_without_mount(config: dict[str, Any]) -> None:
    _move_mount(config, ("head_setup_commands", "worker_setup_commands"))
    _gpu(config)["worker_setup_commands"] = ["true"]  # replaces the global worker_setup_commands for it


def test_shared_mount_check_follows_ray_per_node_type_setup():
    """Mounting in head_setup_commands and worker_setup_commands instead of setup_commands is as good."""
    config = _break("gcp", lambda c: _move_mount(c, ("head_setup_commands", "worker_setup_commands")))
    assert shared_mount_problems(config, "gcp", "/mnt/mcl/sweeps") == []


SHARED_BREAKS = {
    "no mount": _drop("setup_commands", r"sudo mount"),
    "mount only on the head": lambda c: _move_mount(c, ("head_setup_commands",)),
    "worker type's own setup without the mount": _own_worker_setup_without_mount,
    "unguarded mount": _replace_in("setup_commands", "mountpoint -q /mnt/mcl || ", ""),
    "no fstab entry": _drop("setup_commands", r"/etc/fstab"),
    "fstab appended on every run": _replace_in("setup_commands", "grep -q ' /mnt/mcl ' /etc/fstab ||", ""),
    "fstab entry for another folder": _replace_in("setup_commands", " /mnt/mcl nfs", " /mnt/shared nfs"),
    "fstab entry without _netdev": _replace_in("setup_commands", ",_netdev", ""),
    "storage folder not created": _drop("setup_commands", r"mkdir -p /mnt/mcl/sweeps"),
    "not mounted again at worker start": _drop("worker_start_ray_commands", r"mountpoint"),
    "not mounted again at head start": _drop("head_start_ray_commands", r"mountpoint"),
}
AWS_SHARED_BREAKS = {
    "EFS of another region": _replace_in("setup_commands", ".efs.us-east-1.", ".efs.us-west-2."),
    "EFS without NFS 4.1": _replace_in("setup_commands", "nfsvers=4.1,", ""),
}


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
@pytest.mark.parametrize("broken", sorted(SHARED_BREAKS))
def test_shared_mount_check_rejects_broken_setup(cloud, broken):
    config = _break(cloud, SHARED_BREAKS[broken])
    assert config != _launcher(cloud), "the break changed nothing"
    assert shared_mount_problems(config, cloud, "/mnt/mcl/sweeps")


@pytest.mark.parametrize("broken", sorted(AWS_SHARED_BREAKS))
def test_shared_mount_check_rejects_broken_efs_entry(broken):
    config = _break("aws", AWS_SHARED_BREAKS[broken])
    assert config != _launcher("aws"), "the break changed nothing"
    assert shared_mount_problems(config, "aws", "/mnt/mcl/sweeps")


def test_shared_mount_check_wants_the_sweeps_storage_folder():
    assert shared_mount_problems(_launcher("aws"), "aws", "/mnt/mcl/other-sweeps")


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


def _claim(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(
        d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "mcl-shared"
    )


def _head_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _job(docs)["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]


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
    "storage on s3": _entrypoint("storage=/mnt/mcl/sweeps", "storage=s3://my-bucket/mcl-sweeps"),
    "storage off the shared volume": _entrypoint("storage=/mnt/mcl/sweeps", "storage=/tmp/mcl-sweeps"),
    "no storage": _entrypoint("storage=/mnt/mcl/sweeps", ""),
    "workers without the shared volume": lambda docs: _worker(docs).update(
        volumeMounts=[m for m in _worker(docs)["volumeMounts"] if m["mountPath"] != "/mnt/mcl"]
    ),
    "shared volume mounted elsewhere on the head": lambda docs: _head_pod(docs)["containers"][0].update(
        volumeMounts=[{"name": "shared", "mountPath": "/data"}]
    ),
    "shared claim not in the manifest": lambda docs: _claim(docs)["metadata"].update(name="other"),
    "shared claim ReadWriteOnce": lambda docs: _claim(docs)["spec"].update(accessModes=["ReadWriteOnce"]),
}


@pytest.mark.parametrize("broken", sorted(KUBERAY_BREAKS))
def test_kuberay_check_rejects_broken_manifests(broken):
    docs = _kuberay_docs()
    KUBERAY_BREAKS[broken](docs)
    assert kuberay_problems(docs)
