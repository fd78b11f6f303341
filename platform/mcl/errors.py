"""Errors the engine raises for bad user input. Each names what is wrong and where."""


class MclError(Exception):
    """Base class for errors caused by user input (config, data, names)."""


class ConfigError(MclError, ValueError):
    """A config field is unknown, has the wrong type or an impossible value."""


class DataError(MclError, ValueError):
    """A data file or sample is malformed, missing or unsafe."""


class SampleError(DataError):
    """A problem confined to one sample (row) of a data file, which a data check can skip.

    Attributes:
        kind: One of :data:`SAMPLE_PROBLEMS` (``malformed_row`` unless the raiser knows better).
        sample_id: The sample's id where it is known.
        image: The image path concerned (as written in the row, or resolved), where there is one.
    """

    def __init__(
        self,
        message: str,
        kind: str = "malformed_row",
        sample_id: str | None = None,
        image: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.sample_id = sample_id
        self.image = image


SAMPLE_PROBLEMS = (
    "malformed_row",
    "duplicate_id",
    "escaping_path",
    "missing_image",
    "undecodable_image",
    "unknown_answer_type",
)
"""Kinds of :class:`SampleError`: a row missing a field or holding a wrong type; an id seen before in the same
task and split; an image path that is absolute or resolves outside the image root; an image file that is
missing or does not decode; a test sample whose ``answer_type`` names no registered scorer."""


class DataChangedError(DataError):
    """The data under a stream's root differs from its manifest (``stream.manifest``).

    Attributes:
        changed: Relative paths whose size or sha256 differ from the manifest's.
        missing: Relative paths the manifest lists that are gone.
        added: Relative paths that are not in the manifest.
    """

    def __init__(
        self, root: object, manifest: object, changed: list[str], missing: list[str], added: list[str]
    ) -> None:
        self.changed, self.missing, self.added = list(changed), list(missing), list(added)
        parts = [
            f"{label} ({len(paths)}): {', '.join(paths)}"
            for label, paths in (("changed", changed), ("missing", missing), ("added", added))
            if paths
        ]
        super().__init__(
            f"stream.manifest: the data under {root} differs from {manifest}; " + "; ".join(parts)
        )


class UnknownNameError(MclError, KeyError):
    """A method, stream or model name is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class RunStopped(SystemExit):
    """Raised (e.g. by a run's ``on_task`` callback) to end a run early because it was stopped, not because it
    failed.

    :func:`mcl.run.run_experiment` closes the run's open MLflow runs KILLED and adds ``tags`` to them. It is a
    ``SystemExit`` with code 0, which Python and Ray Tune (for a trial's thread) take as a clean end.
    """

    def __init__(self, reason: str, tags: dict[str, str] | None = None) -> None:
        super().__init__(0)
        self.reason = reason
        self.tags = dict(tags or {})

    def __str__(self) -> str:
        return self.reason
