"""Errors that are the user's to fix: the CLI prints them on one line and exits with code 2."""


class UserError(Exception):
    """Bad input: a missing path, an empty dataset, a budget out of range, a foreign stats file."""


def first_line(exc: BaseException) -> str:
    """An exception's first line (its type's name when it has no text): what a one-line error quotes
    of a library's multi-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
