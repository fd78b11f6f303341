"""``eval.tasks: seen_and_next`` and ``stream.probes`` on a real local run (LocalExecutor, tiny LLaVA).

Evaluation does not change training: the same run under ``all`` and ``seen_and_next`` gives the same
evaluated cells and the same metrics; the skipped cells are null. Probes (one from a registered stream's test
split, one from an MLLM-CL test file) are evaluated for the untrained model and after every task, apart from
the matrix.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcl.config import load_config
from mcl.evaluation.policy import masked
from mcl.run import prepare_run, run_stream_locally
from mcl.run.rundir import RunDir
from mcl.run.table import AccuracyTable
from mcl.streams import build_stream
from mcl.worker.job import TaskResult

TASKS = ["aerial", "underwater", "street"]
SMALL = {"train_per_task": 8, "test_per_task": 4}  # one step per task: evaluation is what is tested


def _probe_file(root: Path, out: Path) -> Path:
    """An MLLM-CL test file of 3 ``indoor`` questions, images relative to ``root``."""
    indoor = build_stream("generated", root, {**SMALL, "tasks": ["indoor"]}).tasks[0].test[:3]
    rows = [
        {
            "question_id": s.id,
            "image": str(Path(s.image).relative_to(root)),
            "text": s.question,
            "answer": s.answer,
        }
        for s in indoor
    ]
    out.write_text(json.dumps(rows))
    return out


def _run(tmp_path: Path, root: Path, policy: str, probe_file: Path):
    cfg = load_config(
        "jobs/configs/default.yaml",
        [
            f"stream.root={root}",
            f"stream.options={json.dumps({**SMALL, 'tasks': TASKS})}",
            "scaling.num_workers=1",
            "scaling.deepspeed=false",
            "train.epochs=1",
            "train.batch_size=8",
            "eval.max_samples_per_task=4",
            "eval.max_new_tokens=2",
            f"eval.tasks={policy}",
            "stream.probes="
            + json.dumps(
                [
                    {
                        "name": "indoor",
                        "stream": "generated",
                        "task": "indoor",
                        "root": str(root),
                        "options": SMALL,
                    },
                    {"name": "file", "file": str(probe_file), "image_root": str(root)},
                ]
            ),
        ],
    )
    prep = prepare_run(cfg, log=lambda _m: None)
    out = tmp_path / policy
    return prep, out, run_stream_locally(prep, out, log=lambda _m: None)


def test_seen_and_next_and_probes_on_a_local_run(tiny_model_path, tmp_path):
    root = tmp_path / "data"
    build_stream("generated", root, SMALL)
    probe_file = _probe_file(root, tmp_path / "probe.json")
    _, _, full = _run(tmp_path, root, "all", probe_file)
    prep, out, part = _run(tmp_path, root, "seen_and_next", probe_file)
    assert prep.probe_names == ["indoor", "file"] and len(prep.probes[1].test) == 3
    # Evaluation does not change training: the evaluated cells and every metric are those of the full run.
    assert part.matrix == masked(full.matrix, "seen_and_next") and part.matrix[0][2] is None
    assert part.baseline == full.baseline and None not in part.baseline
    full_table, part_table = AccuracyTable(TASKS), AccuracyTable(TASKS)
    for a, b in zip(full.results, part.results, strict=True):
        full_table.add(a)
        part_table.add(b)
    assert part_table.metrics() == pytest.approx(full_table.metrics())
    # Fewer predictions: row 0 leaves out task 2 (4 samples); probes are evaluated with every row.
    first = TaskResult.load(RunDir(out).path / Path(part.phase_dirs["0:train"]).name)
    assert sorted(first.accuracy) == ["aerial", "underwater"]
    assert len(first.predictions) == 2 * 4 + 4 + 3
    assert {r["task"] for r in first.predictions} >= {"probe:indoor", "probe:file"}
    # Probes: after every task and for the untrained model, the same under both policies, never in the matrix.
    assert set(part.probes) == {"indoor", "file"} and all(len(v) == 3 for v in part.probes.values())
    assert part.probes == full.probes and part.baseline_probes == full.baseline_probes
    data = json.loads(json.dumps(part_table.to_json()))
    assert data["matrix"][0][2] is None and set(data["probes"]) == {"indoor", "file"}
    assert data["probes"]["indoor"]["after_task"] == part.probes["indoor"]
