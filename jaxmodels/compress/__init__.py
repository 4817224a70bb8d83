"""Model compression that wraps a model: integer quantization through qwix (`quantization`: QAT and PTQ).

Magnitude pruning is an optimizer transformation (`jaxmodels.optim.pruning`) and distillation a training
objective (`jaxmodels.train.distill`); the `jaxmodels compress` command that applies all of them to a trained run
is `jaxmodels.tools.compress`."""

from jaxmodels.compress.quantization import ptq, qat

__all__ = ["ptq", "qat"]
