"""The one error type the data pipelines raise for things a user can fix."""

from ttt.errors import ConfigError


class DataConfigError(ConfigError):
    """A one-line message saying what is wrong with the data config and what to change (a
    ConfigError, so the command line reports it like any other config mistake)."""
