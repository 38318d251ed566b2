"""Errors a user can fix. The CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input, a bad flag or a missing file: the message says what and where."""
