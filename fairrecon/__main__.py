"""`python -m fairrecon` is the same as the `fairrecon` command."""

from .cli import main

main()
