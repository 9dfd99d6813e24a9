"""`python -m pipeline` is `eob`."""

from pipeline.ops.cli import main

main()
