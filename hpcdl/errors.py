"""Exceptions for user mistakes (the CLI prints them as one line and exits 2, no traceback), and
the exit codes every hpcdl command and batch script agrees on."""

EXIT_FAILED = 1
EXIT_USER_ERROR = 2
# "temporary failure, try again" (sysexits' EX_TEMPFAIL): a run stopped by SIGTERM/SIGUSR1 with
# its checkpoint kept; batch scripts requeue on it, Snakemake retries.
EXIT_INTERRUPTED = 75


class UserError(Exception):
    """A problem with the user's input (file, key or value), explained in the message."""


class ConfigError(UserError):
    """The sweep configuration is invalid."""


class DatasetError(UserError):
    """A dataset source or dataset file is missing or malformed."""
