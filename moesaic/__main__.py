"""`python -m moesaic` runs the console script."""

from moesaic.cli import main

raise SystemExit(main())
