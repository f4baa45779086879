"""`python cli.py ...` from a checkout: the same program as the installed `qprobe` (qprobe/cli.py)."""
from qprobe.cli import main

if __name__ == "__main__":
    main()
