"""Rotary position embedding (RoPE) frequencies, with the context-extension scalings released models use.

    inv_freq_H, attention_factor = rope_frequencies(head_dim=64, theta=500000.0, scaling="llama3", factor=8.0,
                                                    original_max_len=8192)

`rope_scaling` (TransformerConfig) picks how the per-pair inverse frequencies theta^(-2i/H) are stretched:

- `none`: unchanged (RoFormer, Su et al. 2021).
- `linear`: all divided by `factor` (position interpolation, Chen et al. 2023).
- `llama3`: wavelengths above original_max_len / low_freq_factor divided by `factor`, those below
  original_max_len / high_freq_factor kept, a smooth blend between (Meta's Llama 3.1 release).
- `yarn`: a linear ramp between interpolated and kept frequencies over the pairs whose rotations in
  original_max_len lie between beta_slow and beta_fast, and cos/sin scaled by an attention factor
  (default 0.1 ln(factor) + 1; Peng et al. 2023, "YaRN", eq. 21).

These follow transformers' `modeling_rope_utils.py` (`_compute_*_parameters`), whose values released checkpoints
were trained with; the formulas are written here in NumPy because that module computes them in torch.
"""

import math

import numpy as np

__all__ = ["rope_frequencies", "ROPE_SCALINGS"]

ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")


def rope_frequencies(head_dim: int, theta: float, scaling: str = "none", factor: float = 1.0,
                     original_max_len: int = 8192, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                     beta_fast: float = 32.0, beta_slow: float = 1.0,
                     attention_factor: float | None = None) -> tuple[np.ndarray, float]:
  """(inv_freq_H2 float32 of head_dim / 2 inverse frequencies in radians per position, the cos/sin factor).

  The factor is 1 except for yarn. ValueError for a scaling not in ROPE_SCALINGS.
  """
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  if scaling == "none":
    return inv_freq, 1.0
  if scaling == "linear":
    return inv_freq / factor, 1.0
  if scaling == "llama3":
    low_wavelen, high_wavelen = original_max_len / low_freq_factor, original_max_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled).astype(np.float32), 1.0
  if scaling == "yarn":
    if attention_factor is None:
      attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    # the pair index at which a wavelength makes `rotations` turns in original_max_len (truncated to integers)
    pair = lambda rotations: (head_dim * math.log(original_max_len / (rotations * 2 * math.pi))
                              / (2 * math.log(theta)))
    low, high = max(math.floor(pair(beta_fast)), 0), min(math.ceil(pair(beta_slow)), head_dim - 1)
    high = high + 0.001 if low == high else high  # as transformers: no division by zero
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: the original (extrapolated) frequency, 0: the interpolated one
    return (inv_freq / factor * (1 - keep) + inv_freq * keep).astype(np.float32), float(attention_factor)
  raise ValueError(f"rope_scaling={scaling!r}: expected one of {', '.join(ROPE_SCALINGS)}")
