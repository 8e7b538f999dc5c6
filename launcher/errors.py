"""The one error type that entry points turn into a one-line message and exit code 2."""


class UsageError(ValueError):
    """Bad input from the user: a value, a file, an argument. The message is one line, shown as is."""
