"""The one exception type for user errors.

The CLI turns a :class:`MergeSearchError` into a one-line message on stderr and
exit code 2. Anything else is a bug and keeps its traceback.
"""


class MergeSearchError(Exception):
    """A problem with the user's input: a file, a key, a value."""

    def __init__(self, message: str):
        # One line, always: the CLI prints exactly this.
        super().__init__(" ".join(str(message).split()))
