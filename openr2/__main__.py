"""`python -m openr2` == the `openr2` console script (works under torchrun)."""

from openr2.cli import main

raise SystemExit(main())
