"""User-facing errors: the CLI prints them as one line, without a traceback."""


class ApexError(Exception):
    """A problem the user can fix. The message names the culprit and the fix."""
