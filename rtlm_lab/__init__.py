"""rtlm_lab: a reproducible lab for real-time LM inference under input uncertainty (RT-LM, RTSS 2023)."""

__version__ = "0.1.0"
