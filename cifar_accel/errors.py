"""The exceptions that end a run without a traceback, and the exit statuses they give."""

import signal

EXIT_USER_ERROR = 2  # bad input: nothing was written or changed
EXIT_SYSTEM_REFUSED = 74  # the operating system refused a write (disk full, read-only...): BSD's EX_IOERR
# The signals that stop a run with a checkpoint: Ctrl-C, kill, and SLURM's --signal=USR1@SECONDS warning.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, *((signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ()))


def first_line(error: BaseException) -> str:
    """The first line of what ``error`` says (its type's name when it says nothing): for a one-line refusal that
    wraps what a library raised."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class UserError(ValueError):
    """Bad input from the command line or a file.

    Entry points print its message as one line on stderr and exit with status 2,
    without a traceback; library callers see an ordinary ``ValueError``.
    """


class StoppedBySignal(Exception):
    """SIGINT, SIGTERM or SIGUSR1 stopped the run; exit with ``exit_code`` (128 + the signal's number).

    ``message``, when given, is what the user should do next; otherwise the run already printed it.
    """

    def __init__(self, signal_number: int, message: str | None = None):
        self.signal_name = signal.Signals(signal_number).name
        super().__init__(message or f"stopped by {self.signal_name}")
        self.exit_code = 128 + signal_number
        self.message = message
