"""The one exception type for user mistakes: the CLI prints its message without a traceback."""


class UserError(Exception):
    """A problem with the user's input or arguments; the message names what is wrong and the fix."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C so that a run cleans up the same way."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class PeerFailed(Exception):
    """Another torchrun rank failed and prints its own error: this rank stops without a message of its own, so
    the user reads one line per real error, and exits 0, so that the launcher, which collects the exit codes of the
    ranks that have ended when it first sees one fail, reports the failing rank's code and not this one's."""
