"""Scheduler harness: workloads, policies (RT-LM and baselines), a real executor and a simulator.

See DESIGN.md section 1c and the README section "Scheduling". Entry point: ``rtlm-schedule``
(:mod:`rtlm_lab.tasks.schedule`); library entry point: :func:`rtlm_lab.scheduler.harness.run_experiment`.
"""

from rtlm_lab.scheduler.core import RECORD_COLUMNS, Dispatcher, WorkerSpec
from rtlm_lab.scheduler.policies import POLICIES, Assignment, Policy, Request, WorkerView, make_policy
from rtlm_lab.scheduler.service import ServiceModel, calibrate

__all__ = ["Assignment", "Dispatcher", "POLICIES", "Policy", "RECORD_COLUMNS", "Request", "ServiceModel",
           "WorkerSpec", "WorkerView", "calibrate", "make_policy"]
