"""The one exception type users see (the CLI turns it into a one-line error), `one_line`,
which cuts a caught error's message to its first line, and the one-line error for a missing extra."""


class QProbeError(ValueError):
    """A user-facing error: bad input, a mismatched file, an unreachable model.

    The message is one line that names the file, row or flag at fault.
    """


def one_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# top-level module -> the extra that installs it (setup.cfg [options.extras_require])
EXTRAS = {
    "torch": "torch",
    "transformers": "hf",
    "accelerate": "hf",
    "gguf": "hf",
    "openai": "api",
    "matplotlib": "plot",
}


def missing_extra(err: ImportError, extra: str | None = None) -> Exception:
    """A one-line QProbeError for a missing optional dependency, naming the extra that installs it.

    ``err`` is returned unchanged when its module is not an optional dependency (a real bug).
    """
    top = (getattr(err, "name", None) or "").split(".")[0]
    extra = extra or EXTRAS.get(top)
    if not extra:
        return err
    return QProbeError(f"{top} is not installed; it comes with: pip install 'qprobe[{extra}]'")


def require_extra(extra: str, modules: tuple[str, ...]) -> None:
    """Raise the one-line error for ``extra`` unless every module in ``modules`` can be imported.

    Checked before a backend starts, so that the first missing piece names the whole extra
    (``hf`` needs torch and transformers: installing only torch would fail again).
    """
    import importlib.util

    for mod in modules:
        if importlib.util.find_spec(mod) is None:
            raise QProbeError(f"{mod} is not installed; it comes with: pip install 'qprobe[{extra}]'")
