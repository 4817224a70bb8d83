"""jaxmodels: a JAX/Flax NNX research framework.

Model families live in `jaxmodels.models`, the optimizer factory in
`jaxmodels.optim`, the training loop in `jaxmodels.train`, and every config key
with its default in `jaxmodels.config`.
"""

__version__ = "0.1.0"
