"""The errors a user can cause and fix: `langid` prints these as one line (exit status 2); anything else is a bug."""


class UserError(Exception):
    """A bad flag, file, store or model; the message is the one-line reason, naming the input and the fix."""


class BadValue(UserError, ValueError):
    """A value out of range or of the wrong form; a ValueError too, for callers of the library."""


def one_line(e: object, named: bool = False) -> str:
    """An error's text on one line of at most 200 characters (a library's message may span lines); with `named`,
    after its type's name (for an unexpected error, whose type tells what went wrong)."""
    text = " ".join(str(e).split())[:200]
    return f"{type(e).__name__}: {text}" if named else text
