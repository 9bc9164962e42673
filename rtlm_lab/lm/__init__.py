"""The five LMs behind one interface: :func:`load_lm` returns a :class:`ChatLM` that formats a user turn
for its model, generates greedily until the end of the turn, and reports tokens, stop reason and timings.
"""

from rtlm_lab.lm.generation import ChatLM, Generation
from rtlm_lab.lm.loader import KNOWN_LMS, load_lm, lm_config, resolve_device

__all__ = ["ChatLM", "Generation", "KNOWN_LMS", "load_lm", "lm_config", "resolve_device"]
