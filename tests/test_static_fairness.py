"""The static path's dispatcher plans a worker's busy time with what the policy may know: a baseline's offload
plan must not change when the true lengths do (the leak issue 32 found: ``free_at`` came from ``true_tokens``
for every policy without an RT-LM prediction)."""

from __future__ import annotations

import numpy as np

from rtlm_lab.scheduler.core import Dispatcher, WorkerSpec
from rtlm_lab.scheduler.policies import Request, make_policy
from rtlm_lab.scheduler.service import ServiceModel

SVC = ServiceModel(ttft_a=0.05, ttft_b=0.001, step_1=0.01, step_slope=0.002)
CPU = ServiceModel(ttft_a=0.05, ttft_b=0.001, step_1=0.03)


def _plan(policy_name, true_tokens):
    pol = make_policy(policy_name, {"max_batch": 2})
    pol.typical_tokens = 40.0
    d = Dispatcher(pol, [WorkerSpec("main", "main", 2, SVC), WorkerSpec("cpu0", "offload", 1, CPU),
                         WorkerSpec("cpu1", "offload", 1, CPU)])
    reqs = [Request(request_id=str(i), text="t", context="", arrival_s=0.0, n_input_tokens=10, true_tokens=int(n))
            for i, n in enumerate(true_tokens)]
    plan = []
    for t in np.arange(0.0, 3.0, 0.25):  # requests keep arriving; nothing finishes: the plan rests on estimates
        d.arrive(reqs[int(t * 4)])
        out, _ = d.decide(float(t))
        plan += [(a.worker_id, [r.request_id for r in a.requests]) for a, _ in out]
    return plan, {w: s.free_at for w, s in d.workers.items()}


def test_a_baselines_offload_plan_is_unchanged_when_true_lengths_are_scrambled():
    rng = np.random.default_rng(0)
    true = rng.integers(1, 400, size=12)
    for name in ("fcfs", "sjf_input"):
        a = _plan(name, true)
        b = _plan(name, rng.permutation(true)[::-1] * 3 + 1)
        assert a == b, name
        assert any(w.startswith("cpu") for w, _ in a[0]), name  # the offload workers were used


def test_the_oracle_plans_with_the_truth():
    true = np.array([300] * 12)
    a = _plan("oracle_sjf", true)
    b = _plan("oracle_sjf", true // 30)
    assert a[1] != b[1]  # its busy-until estimate moves with the true lengths, as an oracle's may
