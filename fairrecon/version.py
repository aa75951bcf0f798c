"""fairrecon's version, and the version of the numbers it computes: one home for both.

A leaf module (it imports nothing), at the bottom of the layers: every module may read it, and
pyproject.toml reads `__version__` from here (`dynamic = ["version"]`).

`__version__` names the software (PEP 440); it moves at each release, with a CHANGELOG.md entry.
`RESULTS_VERSION` names the numbers: it moves (+1, with a CHANGELOG.md entry saying what changed)
exactly when an audit of the same spec and inputs would give other numbers than before (a
different initialisation, batch order, training step, metric or split), and never otherwise.
It is part of a results folder's identity (resultsdir.Identity), so an audit never resumes a
folder, or reuses checkpointed cells, whose numbers an older version computed differently.
"""

__version__ = "0.2.0"
RESULTS_VERSION = 2  # 1: the numbers of fairrecon 0.1.0 (folders written before this field existed);
# 2: thread-invariant training; epochs=auto stops by settled.py (at least 500 steps); curve points hold at least
# 256 test images a group (CHANGELOG.md, 0.2.0)
