"""`python -m qprobe ...`: the same program as the installed `qprobe`."""
from qprobe.cli import main

main()
