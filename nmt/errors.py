"""errors.py — the one exception type for mistakes a user can cause (bad config, bad input, bad files).

`nmt.cli` turns it into a one-line `error: ...` and exit status 2; any other exception is a bug.
"""


class NMTError(Exception):
    """A problem with the user's input, config or files, reported as one line without a traceback."""
