"""Errors the user can act on."""


class UserError(Exception):
    """A problem the user can fix. ``str(error)`` is one line that names the problem and, if possible, the fix.

    The panel shows it as is; anything else that escapes is a bug and is shown with a generic prefix.
    """

    def __init__(self, message: str):
        # Collapse whitespace so multi-line engine messages still fit on one panel line.
        super().__init__(" ".join(str(message).split()))
