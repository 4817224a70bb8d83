"""`python -m jaxmodels` is the `jaxmodels` command."""

import sys

from jaxmodels.cli import main

sys.exit(main())
