"""User-facing errors.

Every problem the user can fix (bad input, missing weights, a bundle of another format) is raised as
:class:`NNSAMError` with a one-line message that names the problem and the fix. The command line prints
that line and exits with status 2, never a traceback; the Slicer module shows it in the panel.
"""


class NNSAMError(Exception):
    """A problem the user can fix; ``str(error)`` is a one-line message naming the problem and the fix."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
