"""Errors meshlab reports to users: each one says what is wrong and what to do."""


class LabError(Exception):
    """A lab operation failed; the message is meant for the person at the terminal."""
