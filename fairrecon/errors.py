"""The one exception type for user mistakes, and the exit status of every command.

Library code raises `UserError` with a one-line message that names the file or
value at fault and what is allowed; the CLI prints it and exits with status 2.
`TasksFailed` is work lost where it ran (a Ray worker that died past its retries), not a mistake and
not a bug: the finished cells are saved. Anything else that escapes is a bug in fairrecon.
"""

from enum import IntEnum


class UserError(ValueError):
    """A bad spec, argument, file or dataset: one line, fixable by the user.

    Examples
    --------
    >>> from fairrecon import UserError, run_audit
    >>> try:
    ...     run_audit(dataset="folder", data_root="no-such-folder")
    ... except UserError as e:
    ...     print(e)
    image folder no-such-folder does not exist; pass --data-root DIR with your images
    """


class ExitCode(IntEnum):
    """The exit status of every `fairrecon` command (cli.py), and the gate's outcome (gate.py).

    An int: `sys.exit(ExitCode.FAIL)` exits with 1, and `ExitCode.FAIL == 1`.

    Examples
    --------
    >>> from fairrecon import ExitCode
    >>> ExitCode.INSUFFICIENT == 3, ExitCode(2).name
    (True, 'USAGE')
    """

    PASS = 0  # pass (or done)
    FAIL = 1  # the gate failed: a group gap is above the threshold with confidence (`check` only)
    USAGE = 2  # usage or input error (UserError, click usage errors): one line on stderr
    INSUFFICIENT = 3  # insufficient data to judge (`check`: an interval contains the threshold, a failed cell, ...)
    INTERNAL = 4  # a bug in fairrecon, or TasksFailed (tasks lost on Ray after retries): details go to a log file
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it)


class TasksFailed(Exception):
    """Training tasks that still failed after their retries (executor.py); their audit's finished cells are
    kept, and running the same command again trains the rest. The CLI exits `ExitCode.INTERNAL` (4): not a
    user mistake (2), and no verdict (1, 3).

    str(): one line naming the cells still missing; `details`: each failure in full (for the error log).
    """

    def __init__(self, message: str, details: str):
        super().__init__(message)
        self.details = details
