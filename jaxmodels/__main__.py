"""`python -m jaxmodels` is the `jaxmodels` command."""

from jaxmodels.cli.main import entry

if __name__ == "__main__":  # not when a spawned worker process (jaxmodels prepare) re-imports this module
  entry()
