"""Configuration: every key with its default (`defaults`), its checks (`validate`), experiment files and the one
`--config.K=V` parser (`experiments`)."""

from jaxmodels.config.defaults import default_config, text_lm_config
from jaxmodels.config.experiments import (
                                          add_family_keys,
                                          apply_overrides,
                                          from_saved,
                                          load_experiment,
                                          parse_experiment_args,
                                          parse_override,
                                          saved_config,
                                          set_family,
                                          to_json,
                                          with_values,
)
from jaxmodels.config.validate import expand_preset, fit_to_steps, validate

__all__ = ["add_family_keys", "apply_overrides", "default_config", "expand_preset", "fit_to_steps", "from_saved",
           "load_experiment", "parse_experiment_args", "parse_override", "saved_config", "set_family", "text_lm_config",
           "to_json", "validate", "with_values"]
