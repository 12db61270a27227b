"""The single exception type the data layer raises for bad user input."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the user's data, worded for the command line.

    ``str(error)`` is one line that names the offending file or folder and says
    how to fix it, so the CLI can print it without a traceback.
    """

    def __init__(self, message: str) -> None:
        # Embedded newlines (e.g. from an OS error text) would break the one-line promise.
        super().__init__(" ".join(message.split()))
