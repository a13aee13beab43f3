"""`python -m repro.sparsity`: see repro/sparsity/cli.py."""

from .cli import main

if __name__ == "__main__":
    main()
