"""The one error type users see.

Anything a user can fix (a bad path, an unknown backend, a corrupt cache file) raises `PortableError` with a message
that says what is wrong and what is available. The CLI prints it as one line and exits non-zero; tracebacks appear
only with `--debug`. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class PortableError(Exception):
    """A user-facing error: printed as `error: <message>`, exit code `exit_code`."""

    exit_code = 2


class CacheFileError(PortableError):
    """The cache file cannot be used: missing, corrupt, from another model, or of an unknown format version."""


class BackendUnavailable(PortableError):
    """The backend exists but cannot run on this machine (no GPU, wrong PyTorch build, package missing)."""


class ModelLoadError(PortableError):
    """The model could not be found or loaded."""
