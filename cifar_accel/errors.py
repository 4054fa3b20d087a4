"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(ValueError):
    """Bad input from the command line or a file.

    Entry points print its message as one line on stderr and exit with status 2,
    without a traceback; library callers see an ordinary ``ValueError``.
    """
