"""Exceptions for user mistakes: the CLI prints them as one line and exits 2, no traceback."""


class UserError(Exception):
    """A problem with the user's input (file, key or value), explained in the message."""


class ConfigError(UserError):
    """The sweep configuration is invalid."""


class DatasetError(UserError):
    """A dataset source or dataset file is missing or malformed."""
