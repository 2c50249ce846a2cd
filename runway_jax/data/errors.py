"""The one error type of the data package: a one-line message naming the file or value and the fix."""


class DataError(ValueError):
    """Bad data input (missing or unreadable file, bad value); the message says how to fix it."""
