"""Errors that are the user's to fix: the CLI prints them on one line and exits with code 2."""


class UserError(Exception):
    """Bad input: a missing path, an empty dataset, a budget out of range, a foreign stats file."""
