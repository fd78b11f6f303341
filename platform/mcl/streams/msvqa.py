"""MSVQA (Jiang et al., "Multimodal Continual Learning with MLLMs from Multi-scenario Perspectives", arXiv
2511.18507; data: HF dataset ``Kaij00/MSVQA``): four visual scenarios, as a 4-step or a 20-step stream.

The paper reports last-step VQA score and F1 over "20-step cross-scenario" streams (a third-party summary
also mentions a 5-step setting), but no code, file list or step split of MSVQA could be found in any public
source we searched (GitHub index, HF and paper pages), so layout, protocols and scorer are ours, documented
here and configurable:

Layout under ``stream.root`` (``layout`` moves single scenarios)::

    high_altitude/  images/  train.json  test.json      (also train.jsonl / test.jsonl)
    underwater/     ...
    low_altitude/   ...
    indoor/         ...

``train.json``: LLaVA conversations; ``test.json``: ``{question_id, image, text, answer}`` with image paths
relative to the scenario folder. A row's own ``answer_type`` (e.g. ``vqa`` / ``grounding``) is kept in
``Sample.extra``; every sample is scored by ``msvqa`` (grounding answers are boxes "[x1, y1, x2, y2]").

Protocols (option ``protocol``):

* ``4step`` (default): one task per scenario, in the order above (or option ``tasks``).
* ``20step``: each scenario's train and test samples are split into ``chunks_per_scenario`` (5) chunks by a
  permutation seeded by (``seed``, scenario, split); chunk sizes differ by at most one and keep file order.
  Steps come in rounds: round k holds chunk k of every scenario, the scenarios in an order drawn from a
  generator seeded by ``seed``, rotated by one where a round would start with the scenario that ended the
  previous one. Task names are ``<scenario>_<k>`` (k from 1), so UNIFIER's ``scenarios`` parameter maps every
  step to its scenario branch; ``Sample.extra["scenario"]`` holds the scenario. Every sample appears in
  exactly one step; the same seed gives the same steps from every source.
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mcl.errors import ConfigError, DataError
from mcl.streams.registry import Stream, TaskData, register_stream
from mcl.streams.samples import Sample
from mcl.streams.sources import (
    SPLITS,
    BenchmarkSpec,
    TaskLayout,
    TaskSpec,
    limit_tasks,
    load_tasks,
    parse_options,
)

SCENARIOS: tuple[str, ...] = ("high_altitude", "underwater", "low_altitude", "indoor")
PROTOCOLS = ("4step", "20step")
EXTRA_OPTIONS = {"protocol": "4step", "chunks_per_scenario": 5}
_ORDER_STREAM = 20  # Entropy word separating the step-order generator from the chunk generators.

SPEC = BenchmarkSpec(
    "msvqa",
    tuple(
        TaskSpec(
            scenario,
            TaskLayout(
                (f"{scenario}/train.json", f"{scenario}/train.jsonl"),
                (f"{scenario}/test.json", f"{scenario}/test.jsonl"),
            ),
            "msvqa",
        )
        for scenario in SCENARIOS
    ),
)


def chunk_indices(count: int, chunks: int, seed: int, scenario: str, split: str) -> list[list[int]]:
    """Indices ``0..count-1`` split into ``chunks`` seeded chunks (sizes differ by <= 1), each sorted."""
    rng = np.random.default_rng([seed, zlib.crc32(scenario.encode("utf-8")), SPLITS.index(split)])
    permutation = rng.permutation(count)
    return [sorted(part.tolist()) for part in np.array_split(permutation, chunks)]


def cross_scenario_order(scenarios: list[str], chunks: int, seed: int) -> list[tuple[str, int]]:
    """The (scenario, chunk) of every step: ``chunks`` rounds, each a seeded order of all scenarios."""
    rng = np.random.default_rng([seed, _ORDER_STREAM])
    steps: list[tuple[str, int]] = []
    for chunk in range(chunks):
        order = [scenarios[i] for i in rng.permutation(len(scenarios))]
        if steps and len(order) > 1 and order[0] == steps[-1][0]:
            order = order[1:] + order[:1]
        steps.extend((scenario, chunk) for scenario in order)
    return steps


def cross_scenario_tasks(scenario_tasks: list[TaskData], chunks: int, seed: int) -> list[TaskData]:
    """The 20-step (``chunks`` x scenarios) stream built from one task per scenario (see the module doc)."""
    parts: dict[tuple[str, str], list[list[Sample]]] = {}
    for task in scenario_tasks:
        for split, samples in zip(SPLITS, (task.train, task.test), strict=True):
            if len(samples) < chunks:
                raise DataError(
                    f"stream 'msvqa': scenario {task.name!r} has {len(samples)} {split} samples, fewer than "
                    f"chunks_per_scenario={chunks}"
                )
            parts[task.name, split] = [
                [samples[i] for i in indices]
                for indices in chunk_indices(len(samples), chunks, seed, task.name, split)
            ]
    steps = []
    for scenario, chunk in cross_scenario_order([t.name for t in scenario_tasks], chunks, seed):
        name = f"{scenario}_{chunk + 1}"
        split_samples = [
            [
                replace(sample, task=name, extra={**sample.extra, "scenario": scenario})
                for sample in parts[scenario, split][chunk]
            ]
            for split in SPLITS
        ]
        steps.append(TaskData(name, *split_samples))
    return steps


@register_stream("msvqa")
def msvqa_stream(root: Path, options: dict[str, Any]) -> Stream:
    """MSVQA; options in :mod:`mcl.streams.sources` plus ``protocol`` and ``chunks_per_scenario``.

    ``max_train_per_task`` / ``max_test_per_task`` apply to the final tasks (the steps of ``20step``).
    """
    opts = parse_options("msvqa", options, EXTRA_OPTIONS)
    protocol = opts.extra["protocol"]
    if protocol not in PROTOCOLS:
        raise ConfigError(
            f"stream 'msvqa': option 'protocol' must be one of {', '.join(PROTOCOLS)}, got {protocol!r}"
        )
    chunks = opts.extra["chunks_per_scenario"]
    if protocol == "4step" and "chunks_per_scenario" in options:
        raise ConfigError("stream 'msvqa': option 'chunks_per_scenario' applies to protocol '20step' only")
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise ConfigError(
            f"stream 'msvqa': option 'chunks_per_scenario' must be a positive integer, got {chunks!r}"
        )
    tasks = load_tasks(SPEC, root, opts)
    if protocol == "20step":
        tasks = cross_scenario_tasks(tasks, chunks, opts.seed)
    return Stream("msvqa", limit_tasks(tasks, opts))
