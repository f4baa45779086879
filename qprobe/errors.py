"""The one exception type users see; the CLI turns it into a one-line error."""


class QProbeError(ValueError):
    """A user-facing error: bad input, a mismatched file, an unreachable model.

    The message is one line that names the file, row or flag at fault.
    """
