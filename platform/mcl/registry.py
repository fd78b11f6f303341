"""MLflow model registry: a trial's final method state (adapters, routers, buffers) as a model version.

MLflow 3 registers *logged models*, not bare artifact folders. A stream run's final state is logged as a
logged model (``model_type="mcl-state"``) holding ``state/`` (what the method saved after the last task)
and ``config.yaml`` (the resolved experiment config that produced it), then registered as a version of
``mcl-<stream>-<method>`` tagged with method, stream, task, sweep and trial.

Reload a version with :func:`download_model_version`::

    from mcl.registry import download_model_version
    folder = download_model_version("http://head:5000", "mcl-generated-mr_lora", "1", "restored/")
    # folder/state: the method state after the last task; folder/config.yaml: the run's config.
    # Continue training or evaluate from it, e.g.
    # mcl.run.run_stream_locally(prepare_run(load_config(folder / "config.yaml")), "out",
    #                               start_state=folder / "state", start_task=<tasks trained>)
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

MODEL_TYPE = "mcl-state"


def registered_name(stream: str, method: str) -> str:
    """The registered-model name of a method on a stream (MLflow allows letters, digits, ``-_.``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"mcl-{stream}-{method}")


def register_state(
    client: object,
    experiment_id: str,
    run_id: str,
    name: str,
    state_dir: str | Path,
    config_path: str | Path,
    tags: dict[str, str],
) -> str:
    """Log ``state_dir`` + ``config_path`` as a logged model of run ``run_id`` and register it as a new
    version of ``name``; returns the version. Idempotent per ``tags["trial"]``: a version already
    registered for the same trial is returned instead of adding a second one (a resumed sweep)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    assert isinstance(client, MlflowClient)
    trial = tags.get("trial", "")
    if trial:
        for version in client.search_model_versions(f"name = '{name}'"):
            if version.tags.get("trial") == trial and version.run_id == run_id:
                return version.version
    model = client.create_logged_model(
        experiment_id, name="final_state", source_run_id=run_id, tags=tags, model_type=MODEL_TYPE
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(state_dir, folder / "state")
        shutil.copy(config_path, folder / "config.yaml")
        client.log_model_artifacts(model.model_id, str(folder))
    client.finalize_logged_model(model.model_id, "READY")
    try:
        client.create_registered_model(name, tags={"mcl.kind": "method_state"})
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    # The logged model's artifact location, not ``models:/<id>``: MLflow's sqlite registry resolves the
    # latter through the process-global tracking URI instead of this client's.
    version = client.create_model_version(
        name, source=model.artifact_location, run_id=run_id, tags=tags, model_id=model.model_id
    )
    return version.version


def download_model_version(tracking_uri: str, name: str, version: str, dst: str | Path) -> Path:
    """Download registered version ``version`` of ``name`` into ``dst``; returns the folder holding
    ``state/`` and ``config.yaml``."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    source = client.get_model_version_download_uri(name, str(version))
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri))


__all__ = ["MODEL_TYPE", "download_model_version", "register_state", "registered_name"]
