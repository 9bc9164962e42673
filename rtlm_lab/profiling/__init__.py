"""Real-inference profiler: one row per request (tokens, TTFT, end-to-end latency, stop reason)."""

from rtlm_lab.profiling.profiler import PROFILE_COLUMNS, ProfileStore, run_profile
from rtlm_lab.profiling.summary import summarize

__all__ = ["PROFILE_COLUMNS", "ProfileStore", "run_profile", "summarize"]
