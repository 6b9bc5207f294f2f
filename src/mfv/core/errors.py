"""Errors a user can act on: the CLI prints their message without a traceback."""


class MfvError(ValueError):
    """A problem with the user's input or settings, with a message that says what to do."""
