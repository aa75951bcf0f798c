"""fairrecon: measure which group a reconstruction loss favours, and by how much.

The public API, what a notebook or a test suite uses (each with an example in its docstring):

- run an audit: `run_audit`, `AuditSpec`, `load_spec`; its result: `AuditResult`
- decide: `analyse` -> `Analysis`, `group_intervals`; the gate: `check` -> `Outcome`, `assert_fair`
- show and save: `headline`, `verdict_table`, `audit_figures`, `save_results`
- errors and versions: `UserError`, `ExitCode`, `__version__`, `RESULTS_VERSION` (version.py)
"""

from .audit import run_audit
from .errors import ExitCode, UserError
from .figures import audit_figures
from .gate import Outcome, assert_fair, check
from .outputs import save_results
from .report import headline, verdict_table
from .results import AuditResult
from .spec import AuditSpec, load_spec
from .stats import Analysis, analyse, group_intervals
from .version import RESULTS_VERSION, __version__

__all__ = [
    "run_audit",
    "AuditSpec",
    "load_spec",
    "AuditResult",
    "analyse",
    "Analysis",
    "group_intervals",
    "check",
    "assert_fair",
    "Outcome",
    "headline",
    "verdict_table",
    "audit_figures",
    "save_results",
    "UserError",
    "ExitCode",
    "__version__",
    "RESULTS_VERSION",
]
