"""Iteration-level (continuous-batching) serving: the engine every policy shares.

Requests join and leave the running batch at every decoding step, as in vLLM, SGLang, TGI and transformers'
own ``generate_batch``. One serving loop (:func:`serve`) drives one or more :class:`Engine` s (workers) on a
clock; the *same* loop runs a real run (wall clock, :class:`HFBackend`: transformers' continuous batching with
paged attention, stepped by us) and a simulation (virtual clock, :class:`SimBackend`: a fitted step-time model).

Who owns what (the direction of knowledge DESIGN.md section 4 asks for):

* an **engine** owns its resources: the concurrency budget ``max_seqs`` (requests in one step), the token
  budget ``max_batch_tokens`` (prompt + decode tokens in one step) and the KV cache; both come from the
  platform config, never from the policy, so every policy gets the same engine;
* a **policy** owns order and placement only (:class:`~rtlm_lab.scheduler.policies.Policy`): ``key`` ranks
  jobs (lower runs first), ``preemptive`` says whether a waiting job may displace a running one for a step
  (its KV cache stays put: a pause, not a recompute), ``place`` picks the engine for a request;
* the **predictor** runs on arrival, in its own thread (real) or as a modelled server (sim), and a request is
  *eligible* only once its prediction is done (:class:`PredictorServer`): the cost is on the clock.

Per step, the candidates are the running jobs then the waiting ones in key order (non-preemptive) or all of
them in key order (preemptive); the first ``max_seqs`` that fit the token budget run, a prompt longer than what
is left of the budget is split over steps — the rule of transformers' ``FIFOScheduler._process_candidates``,
which :class:`HFBackend` delegates to (so the simulator mirrors the real engine).
"""


from __future__ import annotations

from rtlm_lab.scheduler.engine.clock import VirtualClock, WallClock
from rtlm_lab.scheduler.engine.jobs import STEP_COLUMNS, Job
from rtlm_lab.scheduler.engine.loop import Engine, EngineThread, serve
from rtlm_lab.scheduler.engine.offload import ProcessBackend
from rtlm_lab.scheduler.engine.paged import HFBackend, PolicyScheduler
from rtlm_lab.scheduler.engine.planner import candidates, plan_step
from rtlm_lab.scheduler.engine.predictor import PredCost, PredictorServer
from rtlm_lab.scheduler.engine.sim import SimBackend
from rtlm_lab.scheduler.engine.slots import SlotBackend
from rtlm_lab.scheduler.engine.stepmodel import StepModel
from rtlm_lab.scheduler.engine.stops import stop_string_ids

__all__ = ["STEP_COLUMNS", "Engine", "EngineThread", "HFBackend", "Job", "PolicyScheduler", "PredCost", "PredictorServer",
           "ProcessBackend", "SimBackend", "SlotBackend", "StepModel", "VirtualClock", "WallClock", "candidates",
           "plan_step", "serve", "stop_string_ids"]
