"""The one exception type for user mistakes: the CLI prints its message without a traceback."""


class UserError(Exception):
    """A problem with the user's input or arguments; the message names what is wrong and the fix."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C so that a run cleans up the same way."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum
