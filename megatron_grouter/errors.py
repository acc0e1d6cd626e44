"""The one exception type users see.

A `UserError` carries a single line that names the problem and the fix. Entry points catch it,
print `error: <line>` and exit with status 2, so bad input never ends in a traceback.
"""


class UserError(Exception):
    """Bad input or configuration; the message is one line: what is wrong and how to fix it."""

    def __init__(self, message: str):
        if "\n" in message:
            raise ValueError("UserError messages must be a single line")
        super().__init__(message)
