"""The one exception type for user mistakes: the CLI prints its message without a traceback."""


class UserError(Exception):
    """A problem with the user's input or arguments; the message names what is wrong and the fix."""
