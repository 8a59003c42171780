"""One error root for everything ptrace reports to a user.

Every error a user can cause (bad input, a broken bundle, a missing engine) is a
``PtraceError``: the CLI prints its message as one line on stderr and exits non-zero, with no
traceback unless ``--debug``. Subclasses also inherit the closest builtin, so library callers can
catch ``FileNotFoundError`` or ``ValueError`` without knowing ptrace's hierarchy.
"""

from __future__ import annotations


class PtraceError(Exception):
    """Root of ptrace's errors. ``hint`` says what to do next, when there is something to do."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        message = super().__str__()
        return f"{message} ({self.hint})" if self.hint else message


class UsageError(PtraceError, ValueError):
    """The user asked for something contradictory or malformed (options, inputs)."""

    exit_code = 2


class ComparisonError(UsageError):
    """Two bundles cannot be compared: they are not runs of the same inputs, or a tensor's shape
    differs between them (a different model)."""


class ModelError(PtraceError, ValueError):
    """A model directory is missing, incomplete or malformed."""

    exit_code = 2


class ModelNotFoundError(ModelError, FileNotFoundError):
    """The model directory does not exist."""


class ModelMismatchError(ModelError):
    """The replay model's weights are not the ones the bundle was captured with."""


class BackendError(PtraceError, RuntimeError):
    """An engine failed, or cannot run here."""


class UnknownBackendError(BackendError, LookupError):
    """No backend of that name is registered."""

    exit_code = 2


class BackendUnavailableError(BackendError, ImportError):
    """The backend is registered but its engine is not installed or cannot start here."""


class BundleError(PtraceError, ValueError):
    """A bundle cannot be read or written as asked."""


class BundleNotFoundError(BundleError, FileNotFoundError):
    """No bundle at that path."""


class BundleExistsError(BundleError, FileExistsError):
    """The output path exists and ``--overwrite`` was not given."""

    exit_code = 2


class NotABundleError(BundleError):
    """The path holds something that is not a ptrace bundle."""


class BundleVersionError(BundleError):
    """The bundle was written by a newer spec version than this ptrace reads."""


class BundleIncompleteError(BundleError):
    """The bundle was not finished (its writer was interrupted): it must not be trusted."""


class BundleCorruptError(BundleError):
    """A checksum failed, or the structure contradicts the manifest."""


class EndpointError(PtraceError, ConnectionError):
    """A serving endpoint did not give a usable answer (down, slow, an error, another model).

    ``result`` is the problem's kind, one word from a small fixed set: the canary counts it as a
    Prometheus label value and carries on (``ptrace.monitor``).
    """

    def __init__(self, result: str, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.result = result
        #: the HTTP status of an error answer
        self.status = status
