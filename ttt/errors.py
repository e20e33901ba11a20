"""The error a user can fix by changing the configuration: one line naming the key to change.

A leaf module (it imports nothing of `ttt`), so every level that reports such mistakes — the data
pipelines, config validation, the trainer, the command lines — raises the same type, and the
command lines turn any of them into `error: <message>` and exit status 2.
"""


class ConfigError(ValueError):
    """A configuration mistake a user can fix; the message names the offending key."""
