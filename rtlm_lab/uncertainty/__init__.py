"""Linguistic input uncertainty of prompts (six types + a weighted total); see :mod:`.quantifier`."""

from rtlm_lab.uncertainty.quantifier import (
    K, MAX_CHARS, MAX_TOKENS, THRESHOLDS, TOTAL_WEIGHTS, UNCERTAINTY_TYPES, explain, quantify,
)

__all__ = ["quantify", "explain", "UNCERTAINTY_TYPES", "THRESHOLDS", "TOTAL_WEIGHTS", "K", "MAX_CHARS",
           "MAX_TOKENS"]
