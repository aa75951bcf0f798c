"""The one exception type for user mistakes.

Library code raises `UserError` with a one-line message that names the file or
value at fault and what is allowed; the CLI prints it and exits with status 2.
Anything else that escapes is a bug in fairrecon, not a user mistake.
"""


class UserError(ValueError):
    """A bad spec, argument, file or dataset: one line, fixable by the user."""


class TasksFailed(Exception):
    """Training tasks that still failed after their retries (executor.py); their audit's finished cells are
    kept, and running the same command again trains the rest. The CLI exits 4.

    str(): one line naming the cells still missing; `details`: each failure in full (for the error log).
    """

    def __init__(self, message: str, details: str):
        super().__init__(message)
        self.details = details
