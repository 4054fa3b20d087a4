"""The exceptions that end a run without a traceback."""


class UserError(ValueError):
    """Bad input from the command line or a file.

    Entry points print its message as one line on stderr and exit with status 2,
    without a traceback; library callers see an ordinary ``ValueError``.
    """


class StoppedBySignal(Exception):
    """SIGINT or SIGTERM stopped training after a checkpoint was saved; exit with ``exit_code``."""

    def __init__(self, signal_number: int):
        super().__init__(f"stopped by signal {signal_number}")
        self.exit_code = 128 + signal_number
