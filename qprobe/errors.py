"""The one exception type users see (the CLI turns it into a one-line error), and
`_one_line`, which cuts a caught error's message to its first line."""


class QProbeError(ValueError):
    """A user-facing error: bad input, a mismatched file, an unreachable model.

    The message is one line that names the file, row or flag at fault.
    """


def _one_line(err: Exception) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
