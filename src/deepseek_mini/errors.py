"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """A mistake in a config, path, checkpoint, prompt or argument.

    The CLI turns it into one ``error: ...`` line on stderr and exit status 2; anything
    else that escapes is an internal bug and keeps its traceback.
    """
