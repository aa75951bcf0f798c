"""fairrecon: measure which group a reconstruction loss favours, and by how much."""

__version__ = "0.1.0"

from .audit import run_audit  # noqa: E402
from .errors import UserError  # noqa: E402
from .outputs import save_results  # noqa: E402
from .results import AuditResult  # noqa: E402
from .spec import AuditSpec, load_spec  # noqa: E402
from .stats import Analysis, analyse  # noqa: E402

__all__ = [
    "run_audit",
    "analyse",
    "save_results",
    "Analysis",
    "AuditResult",
    "AuditSpec",
    "load_spec",
    "UserError",
    "__version__",
]
