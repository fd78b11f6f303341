"""Console noise of the libraries mcl drives, silenced where it is raised: each filter names one warning
(category, message, module) or one logger, so every other warning and error still shows.

- :func:`quiet_known_warnings`: deprecation warnings raised inside libraries on every run, about calls
  mcl does not make (peft asks for transformers' deprecated ``is_gradient_checkpointing``; DeepSpeed's ZeRO
  calls torch's deprecated ``all_gather_into_tensor``). Installed wherever a model is trained.
- :func:`quiet_ray_worker_logs`: in a Ray Train worker, Ray Data's and Ray Train's INFO lines and Ray
  Data's "Progress bars disabled" notice (mcl disables them on purpose; mcl prints its own progress).
- :func:`quiet_ray_driver_logs`: in the driver, Ray's INFO lines about packaging the runtime env's modules,
  and its warning that it turned token authentication on for a new local instance (its default; the warning
  that authentication is *off* still shows).
"""

from __future__ import annotations

import contextlib
import logging
import warnings

# (message regex, category, module regex of the frame the warning is attributed to)
KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # peft.peft_model reads model.is_gradient_checkpointing (a FutureWarning in transformers 5).
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
    # DeepSpeed's ZeRO all-gathers through torch.distributed.all_gather_into_tensor (deprecated in torch 2.13);
    # torch's c10d logger wrapper is the frame the warning points at.
    (
        r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        FutureWarning,
        r"torch\.distributed\.c10d_logger",
    ),
)

# Ray's loggers that report routine progress at INFO in a Train worker (warnings and errors still show).
RAY_WORKER_LOGGERS = ("ray.data", "ray.train")
# Ray Data warns once per process that progress bars are off; mcl turns them off (RAY_DATA_DISABLE_PROGRESS_BARS).
RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"
# "Creating / Pushing / Successfully pushed file package" for every module shipped in the runtime env.
RAY_PACKAGING_LOGGER = "ray._private.runtime_env.packaging"
# Ray turns token authentication on for every new local instance and warns that it did, on every run.
# (Setting RAY_AUTH_MODE=token in this process would not do: Ray caches its config when it is imported.)
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
RAY_AUTH_ENABLED_NOTICE = "Token authentication is enabled for this Ray cluster"


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_known_warnings() -> None:
    """Ignore the library deprecation warnings listed in :data:`KNOWN_WARNINGS` (idempotent)."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def quiet_ray_worker_logs() -> None:
    """In a Ray Train worker: Ray's routine INFO lines and the progress-bar notice off, warnings on."""
    for name in RAY_WORKER_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)  # one line per dataset execution otherwise
    logging.getLogger(RAY_DATA_PROGRESS_LOGGER).setLevel(logging.ERROR)
    # One "Reporting training result" line per phase and rank, from a logger Ray names by its file's path.
    with contextlib.suppress(ImportError):
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    quiet_known_warnings()


def quiet_ray_driver_logs() -> None:
    """In the driver: Ray's INFO lines about packaging the runtime env and its notice that token auth is on
    (its default) off; its other warnings still show (idempotent)."""
    logging.getLogger(RAY_PACKAGING_LOGGER).setLevel(logging.WARNING)
    auth = logging.getLogger(RAY_AUTH_LOGGER)
    if not any(isinstance(f, _DropMessage) for f in auth.filters):
        auth.addFilter(_DropMessage(RAY_AUTH_ENABLED_NOTICE))
