"""User-facing errors: a message that names the file, key or value at fault.

Every entry point (CLI, job, HTTP API) prints a `FluxrayError` as one line and
exits non-zero (or answers 4xx); anything else is a bug and keeps its traceback.
"""


class FluxrayError(Exception):
    """Bad input or environment that the user can fix; the message says how."""


class ConfigError(FluxrayError):
    """A job config that does not validate; the message names the dotted key."""


class DatasetError(FluxrayError):
    """A dataset that cannot be prepared or read; the message names the file."""
