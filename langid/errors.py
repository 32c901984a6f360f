"""The errors a user can cause and fix: `langid` prints these as one line (exit status 2); anything else is a bug."""


class UserError(Exception):
    """A bad flag, file, store or model; the message is the one-line reason, naming the input and the fix."""


class BadValue(UserError, ValueError):
    """A value out of range or of the wrong form; a ValueError too, for callers of the library."""
