"""The one exception type for user mistakes.

Library code raises `UserError` with a one-line message that names the file or
value at fault and what is allowed; the CLI prints it and exits with status 2.
Anything else that escapes is a bug in fairrecon, not a user mistake.
"""


class UserError(ValueError):
    """A bad spec, argument, file or dataset: one line, fixable by the user."""
