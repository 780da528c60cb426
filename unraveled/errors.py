"""Exceptions the CLI turns into exit statuses.

Each one says what went wrong and how to fix it; the CLI prints the message without a
traceback.
"""

from __future__ import annotations


class UnraveledError(Exception):
    """Base class: an error a user can fix, reported without a traceback."""

    exit_code = 1


class ConfigError(UnraveledError):
    """A config file, an option, a ``--set`` override or a config name is invalid (exit 2)."""

    exit_code = 2

    def __init__(self, source: str, field: str | None, problem: str) -> None:
        """The error in ``source`` (a file or an option), at ``field`` when there is one.

        Args:
            source: The config file's path, the config name, or the option (``--set``, ``--out``).
            field: The key at fault (``params.prompt``), or None for the source as a whole.
            problem: What is wrong and what was expected.
        """
        self.source = source
        self.field = field
        self.problem = problem
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {problem}")


class ParamError(UnraveledError, ValueError):
    """A param the model can't take, or a value the params' schema refuses (exit 2).

    Raised by the model checks (the runner adds the config file) and by ``unraveled.run`` for a
    keyword argument. A ``ValueError`` too, as Python code expects of a bad argument.
    """

    exit_code = 2

    def __init__(self, field: str, problem: str, *, prefix: str = "params.") -> None:
        """The error at ``params.<field>``; ``problem`` says what the model can take.

        ``prefix=""`` names an argument that is not a param (``unraveled.run``'s ``seed``).
        """
        self.field = field
        self.problem = problem
        super().__init__(f"{prefix}{field}: {problem}")


class ModelUnavailableError(UnraveledError):
    """A model could not be loaded from any of the places it may come from (exit status 3)."""

    exit_code = 3


class BadCheckpointError(UnraveledError):
    """A folder given as a model is not a usable checkpoint (exit 2: bad input, no fallback)."""

    exit_code = 2
