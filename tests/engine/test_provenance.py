"""Provenance tags, data manifests, reproduction of a tracked run and the MLflow experiment's UI tags.

Real git, real files, real MLflow (sqlite); the reproduction runs the in-process executor (``LocalExecutor``),
the tracked run's own, end to end through ``jobs/run_stream.py --from-run``. The Ray path's provenance tags are
checked on the two-worker run of ``tests/engine/test_ray_runs.py``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from mcl.config import load_config
from mcl.errors import DataChangedError
from mcl.run import provenance
from mcl.run.reproduce import TrackedRun, compare_runs

REPO = Path(__file__).resolve().parents[2]


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"mcl_prov_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_versions_name_every_package_and_absent_ones(monkeypatch):
    import torch

    found = provenance.versions()
    assert set(found) == {"python", *provenance.PACKAGES}
    assert found["torch"] == torch.__version__ and "absent" not in found.values()
    monkeypatch.setattr(provenance, "PACKAGES", ("torch", "mcl-no-such-package"))
    assert provenance.versions()["mcl-no-such-package"] == "absent"


def test_hardware_and_no_ray_cluster_when_ray_is_not_initialised():
    hw = provenance.hardware()
    assert hw["cpu_count"] >= 1 and hw["memory_gb"] > 0 and hw["cpu_model"]
    assert (hw["gpu_count"] == 0) == (hw["gpu_model"] == "none")
    import ray

    if not ray.is_initialized():
        assert provenance.ray_cluster() == {}


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_code_identity_is_the_commit_and_dirty_flag_or_a_hash_of_the_source(tmp_path):
    repo = tmp_path / "repo"
    (repo / "platform" / "mcl").mkdir(parents=True)
    (repo / "platform" / "mcl" / "a.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    clean = provenance.code_identity(repo)
    assert len(clean["code_commit"]) == 40 and clean["code_dirty"] is False
    (repo / "platform" / "mcl" / "a.py").write_text("x = 2\n")
    dirty = provenance.code_identity(repo)
    assert dirty["code_commit"] == clean["code_commit"] and dirty["code_dirty"] is True
    assert len(dirty["code_diff_sha256"]) == 64

    shipped = tmp_path / "working_dir"  # what `ray job submit --working-dir` unpacks: no .git
    shutil.copytree(repo, shipped, ignore=shutil.ignore_patterns(".git"))
    first = provenance.code_identity(shipped)
    assert first["code_files"] == 1 and "code_commit" not in first
    (shipped / "notes.png").write_bytes(b"not source")
    assert provenance.code_identity(shipped)["code_sha256"] == first["code_sha256"]
    (shipped / "platform" / "mcl" / "a.py").write_text("x = 3\n")
    assert provenance.code_identity(shipped)["code_sha256"] != first["code_sha256"]


def test_config_hash_ignores_where_a_run_is_recorded_only():
    base = load_config("jobs/configs/default.yaml")
    moved = load_config("jobs/configs/default.yaml", ["tracking.run_name=x", "tracking.uri=sqlite:////x.db"])
    changed = load_config("jobs/configs/default.yaml", ["train.lr=0.001"])
    assert provenance.config_sha256(base) == provenance.config_sha256(moved)
    assert provenance.config_sha256(base) != provenance.config_sha256(changed)


@pytest.fixture
def small_stream(tmp_path):
    from mcl.streams import build_stream

    root = tmp_path / "data"
    build_stream("generated", root, {"train_per_task": 8, "test_per_task": 4, "tasks": ["aerial", "street"]})
    return root


def test_manifest_from_prepare_data_is_checked_before_training(small_stream, tmp_path, tiny_model_path):
    from mcl.run import prepare_run

    manifest = tmp_path / "data.manifest.json"
    job = _job("prepare_data")
    args = ["--stream", "generated", "--root", str(small_stream), "--report", str(tmp_path / "r.json")]
    args += ["--option", "train_per_task=8", "--option", "test_per_task=4"]
    assert job.main([*args, "--manifest", str(manifest)]) == 0
    written = json.loads(manifest.read_text())
    assert "aerial/train.json" in written["annotations"] and "stream.json" in written["annotations"]
    assert len(written["images"]) == 4 * 12 and all(e["size"] > 0 for e in written["images"].values())

    overrides = [
        f"stream.root={small_stream}",
        "stream.options={train_per_task: 8, test_per_task: 4, tasks: [aerial, street]}",
        f"stream.manifest={manifest}",
        "scaling.num_workers=1",
    ]
    cfg = load_config("jobs/configs/default.yaml", overrides)
    prep = prepare_run(cfg, log=lambda _m: None)
    assert prep.manifest_sha256 == provenance.data_identity("", prep.manifest_sha256)["data_manifest_sha256"]

    rows = json.loads((small_stream / "aerial" / "test.json").read_text())
    rows[0]["answer"] = "changed"
    (small_stream / "aerial" / "test.json").write_text(json.dumps(rows))
    (small_stream / "street" / "images" / "street-train-00003.png").unlink()
    (small_stream / "street" / "extra.json").write_text("[]")
    with pytest.raises(DataChangedError) as err:
        prepare_run(cfg, log=lambda _m: None)
    assert err.value.changed == ["aerial/test.json"]
    assert err.value.missing == ["street/images/street-train-00003.png"]
    assert err.value.added == ["street/extra.json"]
    for name in ("aerial/test.json", "street/images/street-train-00003.png", "street/extra.json"):
        assert name in str(err.value)


def test_compare_runs_names_every_differing_cell():
    cfg = load_config(None)
    a = TrackedRun("a", "a", cfg, ["x", "y"], [[50.0, 0.0], [25.0, 75.0]], [0.0, 0.0])
    b = TrackedRun("b", "b", cfg, ["x", "y"], [[50.0, 0.0], [25.0, 75.5]], [0.0, 0.0])
    assert compare_runs(a, a) == []
    assert compare_runs(a, b) == ["after y, on y: 75.0 -> 75.5"]


def test_from_run_reproduces_a_tracked_run_and_reports_a_mismatch(
    small_stream, tmp_path, tiny_model_path, capsys
):
    from mlflow import MlflowClient

    from mcl.run import run_experiment
    from mcl.run.executors.local import LocalExecutor
    from mcl.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, RUNS_VIEW_TAG

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(
        "jobs/configs/default.yaml",
        [
            f"stream.root={small_stream}",
            "stream.options={train_per_task: 8, test_per_task: 4, tasks: [aerial]}",
            "scaling.num_workers=1",
            "scaling.deepspeed=false",
            "train.epochs=1",
            "train.batch_size=8",
            "eval.max_new_tokens=2",
            f"tracking.uri={uri}",
            f"tracking.output_dir={tmp_path}/runs",
            "tracking.run_name=original",
        ],
    )
    original = run_experiment(cfg, log=lambda _m: None, executor=LocalExecutor)
    client = MlflowClient(uri)
    tags = client.get_run(original.run_id).data.tags
    p = provenance.PREFIX
    assert tags[p + "config_sha256"] == provenance.config_sha256(cfg)
    assert (
        tags[p + "data_annotations_sha256"]
        == provenance.data_identity(small_stream)["data_annotations_sha256"]
    )
    assert tags[p + "version.torch"] == provenance.versions()["torch"]
    assert tags[p + "executor"] == "mcl.run.executors.local.LocalExecutor"  # the re-run trains in-process too
    # The experiment opens on MLflow's training-runs view, with the key-metrics view saved.
    exp = client.get_experiment(original.experiment_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    view = json.loads(json.loads(exp.tags[RUNS_VIEW_TAG])["state"])
    assert view["selectedColumns"][:3] == ["metrics.`mfn`", "metrics.`bwt`", "metrics.`maa`"]

    job = _job("run_stream")
    # Only where the run is recorded may change.
    assert job.main(["--from-run", original.run_id, f"tracking.uri={uri}", "train.lr=0.1"]) == 2
    assert job.main(["--from-run", original.run_id, f"tracking.uri={uri}"]) == 0
    out = capsys.readouterr().out
    assert "verdict: REPRODUCED" in out and out.count("after aerial") == 2
    assert "workflowType=machine_learning" in out
    repro = client.search_runs(
        [original.experiment_id],
        filter_string=f"tags.`mcl.reproduces` = '{original.run_id}' and tags.`mcl.kind` = 'stream_run'",
    )
    assert len(repro) == 1 and repro[0].data.tags[p + "config_sha256"] == tags[p + "config_sha256"]

    # A tracked matrix that the re-run cannot give: exit status 1, the cell named.
    matrix = json.loads(
        Path(client.download_artifacts(original.run_id, "accuracy_matrix.json", str(tmp_path))).read_text()
    )
    matrix["matrix"][0][0] += 0.5
    tampered = tmp_path / "tampered" / "accuracy_matrix.json"
    tampered.parent.mkdir()
    tampered.write_text(json.dumps(matrix))
    client.log_artifact(original.run_id, str(tampered))
    assert job.main(["--from-run", original.run_id, f"tracking.uri={uri}"]) == 1
    out = capsys.readouterr().out
    assert "verdict: NOT REPRODUCED, 1 cells differ" in out and "after aerial, on aerial" in out
