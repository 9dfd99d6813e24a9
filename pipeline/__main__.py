"""`python -m pipeline` is `eob`."""

from pipeline.cli import main

main()
