"""Errors a user can cause. The CLI prints these as one line, without a traceback."""


class UserError(Exception):
    """Bad input: the message names the thing and says what to do."""
