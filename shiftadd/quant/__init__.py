"""The reparameterization math: BCQ planes, power-of-two scales, packing for the kernels."""

from .apot import apot_decompose, apot_round
from .bcq import MU, SUPPORTED_BITS, BCQConfig, BCQWeight, quantize_matrix

__all__ = ["MU", "SUPPORTED_BITS", "BCQConfig", "BCQWeight", "apot_decompose", "apot_round", "quantize_matrix"]
