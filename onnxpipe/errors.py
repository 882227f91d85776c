"""The project's error type: raised by the library, turned into one line by the CLI."""


class OnnxpipeError(Exception):
    """An error a person can act on: what was wrong, with which file, and what to do."""
