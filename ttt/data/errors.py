"""The one error type the data pipelines raise for things a user can fix."""


class DataConfigError(ValueError):
    """A one-line message saying what is wrong with the data config and what to change."""
