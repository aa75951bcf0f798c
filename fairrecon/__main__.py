"""`python -m fairrecon` is the same as the `fairrecon` command."""

from .cli import main

if __name__ == "__main__":  # not on import (pytest --doctest-modules imports every module)
    main()
