"""Configuration: every key with its default (`defaults`), its checks (`validate`), experiment files and the one
`--config.K=V` parser (`experiments`)."""

from jaxmodels.config.defaults import default_config, text_lm_config
from jaxmodels.config.experiments import (
                                          from_saved,
                                          load_experiment,
                                          parse_experiment_flags,
                                          saved_config,
                                          to_json,
)
from jaxmodels.config.validate import expand_preset, fit_to_steps, validate

__all__ = ["default_config", "expand_preset", "fit_to_steps", "from_saved", "load_experiment",
           "parse_experiment_flags", "saved_config", "text_lm_config", "to_json", "validate"]
