"""Errors the engine raises for bad user input. Each names what is wrong and where."""


class MclError(Exception):
    """Base class for errors caused by user input (config, data, names)."""


class ConfigError(MclError, ValueError):
    """A config field is unknown, has the wrong type or an impossible value."""


class DataError(MclError, ValueError):
    """A data file or sample is malformed, missing or unsafe."""


class UnknownNameError(MclError, KeyError):
    """A method, stream or model name is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""
