"""Errors that reach users as one line, never as a traceback."""


class UserInputError(ValueError):
    """Bad input from a user (a file, a flag, a constraint): the message is the whole story.

    The CLI prints `moecompile: error: <message>` and exits with code 2.
    """
