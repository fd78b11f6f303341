"""The actor pool's pure parts: per-actor resources as Ray arguments, the actor's own error out of Ray's."""

from __future__ import annotations

from mcl.evaluation.actor_pool import actor_remote_args, root_error


def test_resources_per_actor_become_ray_remote_arguments() -> None:
    assert actor_remote_args({"CPU": 1}) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert actor_remote_args({"GPU": 1, "CPU": 2, "accelerator_type:H100": 0.5}) == {
        "num_cpus": 2.0,
        "num_gpus": 1.0,
        "resources": {"accelerator_type:H100": 0.5},
    }


def test_the_actors_own_error_line_is_found_under_rays_wrapping() -> None:
    class RayTaskError(Exception):
        pass

    wrapped = RayTaskError(
        "ray::MapWorker(MapBatches(PhaseAnswerer)).submit()\n"
        '  File "generation.py", line 87, in answer\n'
        "RuntimeError: failing_generate: this method cannot answer\n\n"
        "The above exception was the direct cause of the following exception:\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block."
    )
    assert root_error(wrapped) == "RuntimeError: failing_generate: this method cannot answer"
    assert root_error(ValueError("bad state\nsecond line")) == "ValueError: bad state"
