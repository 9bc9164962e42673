"""RT-LM's output-length regressor over input-uncertainty features, its baselines and evaluation.

* :class:`LengthPredictor` (:mod:`.predictor`): fit / predict / predict_quantile / update / save / load;
* :class:`~rtlm_lab.regressor.distribution.QuantileLengthPredictor` (:mod:`.distribution`): output-length
  quantiles at fixed levels (fit / predict_quantiles / update), its distributional table and drift test;
* :mod:`.features`: uncertainty features and the MiniLM embedding;
* :mod:`.baselines`: constant, input length, MiniLM proxy (SSJF / S3), pairwise learning-to-rank (vLLM-LTR);
* :mod:`.evaluate`: the method comparison on held-out conversations (``rtlm-train-regressor``);
* :mod:`.lmstate`: the served LM's own prefill states (hidden states, entropy, end-of-turn probability),
  :class:`~rtlm_lab.regressor.lmstate.LMStatePredictor` and step-k remaining-length refinement;
  :mod:`.probes`: ridge / MLP / ordinal-bins / pairwise-rank probes over them;
* :mod:`.recalibration`: cross-LM recalibration experiment; :mod:`.bench`: overhead benchmark;
  :mod:`.reference`: the comparison over every reference profile.
"""

from rtlm_lab.regressor.features import FEATURE_NAMES
from rtlm_lab.regressor.predictor import KINDS, LengthPredictor

__all__ = ["LengthPredictor", "KINDS", "FEATURE_NAMES"]
