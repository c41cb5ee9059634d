"""The errors the project raises for a user to act on, each named for what failed; the CLI prints them as one line."""

from __future__ import annotations


class CxrError(Exception):
    """A problem a user fixes (a setting, a folder, a server), reported as one line with exit status 2."""


class DataError(CxrError, ValueError):
    """The dataset or an image folder is missing, misnamed, incomplete or not what was asked for."""


class ConfigError(CxrError, ValueError):
    """Settings that cannot work together: the environment of a distributed search, a path to write to."""


class ServerError(CxrError, RuntimeError):
    """A server the work depends on (MLflow tracking, the Prefect API, a search chief) does not answer, or a
    port cannot be listened on."""
