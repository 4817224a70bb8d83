"""Where a trained run lives and how it is read back: the train state (`state`), Orbax checkpoints
(`checkpoint`), and parameter exports for research code (`export`: `load_model`, `load_params`)."""
