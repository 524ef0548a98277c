"""dataplane's exceptions.

Each also subclasses the matching builtin, so callers can catch either
(``except KeyError`` still works for a missing variable).
"""

from __future__ import annotations

__all__ = [
    "ChannelBroken",
    "ChannelBusyError",
    "DataplaneError",
    "IntegrityError",
    "MissingDependencyError",
    "OptionError",
    "ReadOnlyError",
    "SchemaError",
    "StepTimeoutError",
    "StorageFullError",
    "Terminated",
    "UnknownOptionError",
    "UnknownSchemeError",
    "VariableNotFoundError",
]


class DataplaneError(Exception):
    """Base class of every error dataplane raises on purpose."""


class UnknownSchemeError(DataplaneError, ValueError):
    """A URL names a scheme no transport is registered for."""


class OptionError(DataplaneError, ValueError):
    """An option or argument has a value that cannot work (policy, queue_limit, timeout, URL)."""


class UnknownOptionError(OptionError, TypeError):
    """A transport was given an option it does not take."""


class MissingDependencyError(DataplaneError, ImportError):
    """A transport or feature needs an optional package that is not installed."""


class VariableNotFoundError(DataplaneError, KeyError):
    """A step or archive has no variable of that name."""

    def __str__(self) -> str:
        # KeyError quotes its argument; keep the message readable.
        return str(self.args[0]) if self.args else ""


class SchemaError(DataplaneError, ValueError):
    """Data does not fit the channel: dtype, shape, name, selection or attribute value."""


class StepTimeoutError(DataplaneError, TimeoutError):
    """No step arrived within the timeout. The channel may still be alive."""


class ChannelBroken(DataplaneError, ConnectionError):
    """The other side of a channel is gone: the writer died or aborted."""


class ChannelBusyError(DataplaneError, FileExistsError):
    """The channel already has a live writer; there is one writer per channel."""


class IntegrityError(DataplaneError, ValueError):
    """Stored bytes do not match what was written: a checksum mismatch, truncation, corruption."""


class StorageFullError(DataplaneError, OSError):
    """The filesystem is full, the quota reached or a file at its size limit (``errno`` says
    which: ENOSPC, EDQUOT, EFBIG) while writing a step. The steps before it are complete and
    readable; the one being written is not visible. Free space, then write on (the same
    publisher, or a new one with mode="a")."""


class ReadOnlyError(DataplaneError, PermissionError):
    """An attempt to modify data opened for reading."""


class Terminated(SystemExit):
    """The process got SIGTERM (a scheduler ending the job) while a publisher was open.

    Raised in the main thread by the handler :func:`dataplane.publish` installs when SIGTERM
    has its default action: ``with publish(...)`` then ends the channel cleanly (subscribers
    get end of stream after every completed step; a step being written is dropped whole) and
    the process exits with status 143, as the default action would have. A second SIGTERM
    kills at once. A ``SystemExit``, not a ``DataplaneError``: it ends the program.
    """

    def __init__(self, signum: int = 15) -> None:
        super().__init__(128 + signum)
