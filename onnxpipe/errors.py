"""The project's error type: raised by the library, turned into one line by the CLI."""


class OnnxpipeError(Exception):
    """An error a person can act on: what was wrong, with which file, and what to do."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name where it has none), cut to ``limit`` characters:
    what a one-line error quotes of another library's error."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
