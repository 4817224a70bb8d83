"""`python -m jaxmodels` is the `jaxmodels` command."""

from jaxmodels.cli import entry

entry()
