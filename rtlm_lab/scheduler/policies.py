"""Scheduling policies behind one small interface.

A policy sees the queue (requests that arrived and wait), the workers (which are idle, when the busy ones
are predicted to be free) and the clock, and returns what to start now plus, optionally, when it wants to be
asked again (a batching wait):

    class MyPolicy(Policy):
        name = "my_policy"
        needs = ("pred_proxy",)               # prediction columns it reads (predictions.ALL_COLUMNS)

        def priority(self, req, now):         # lower is served first
            return req.pred["pred_proxy"]

The default :meth:`Policy.select` serves the idle *main* worker (the platform's device) with the first
``max_batch`` requests in priority order; an idle CPU offload worker takes the first request expected to finish
sooner there (shortest expected delay, :meth:`Policy._offload`): every policy uses the same workers, RT-LM with
its length predictions, the baselines with the typical reply length, the oracles with the true one.
Register a new policy in :data:`POLICIES` (or pass an instance to the simulator / executor directly).

Built in: ``fcfs``, ``sjf_input`` (prompt tokens), ``sjf_proxy`` (MiniLM proxy prediction), ``ltr`` (MiniLM
ranking score), ``oracle_sjf`` (the true output length: the lower bound of what ordering alone can do) and
``rtlm`` with its ablations ``rtlm_no_uncertainty``, ``rtlm_no_aging``, ``rtlm_no_consolidation``,
``rtlm_no_offload``, ``rtlm_batch1``; our extension ``lmstate`` (the served LM's own prefill-state length
prediction, refined while decoding; preemptive, with aging) and its ablation ``lmstate_no_refine``; and the
distribution-aware ``gittins`` (the Gittins index of each request's predicted length distribution at its attained
service, :mod:`rtlm_lab.scheduler.gittins`) with its ablation ``srpt_expected`` (expected remaining tokens), both
preemptive, both reading the predicted quantiles ``req.pred["pred_quantiles"]``; and ``gittins_lmstate``, the
Gittins index over the LM-state probe's own length distribution (read from the engine's forward, as ``lmstate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from rtlm_lab.errors import UserError


@dataclass
class Request:
    """One request as the scheduler sees it."""

    request_id: str
    text: str
    context: str
    arrival_s: float
    n_input_tokens: int
    true_tokens: int                       # known to the oracle policy (and the simulator) only
    pred: dict[str, float] = field(default_factory=dict)
    isolated_s: float = math.nan           # service model, batch 1, true tokens (SLO reference)
    retries: int = 0
    sample: int = 0                        # sampled decoding: which of the request's seeded samples it draws
    true_dist: tuple = ()                  # sampled decoding: the prompt's sampled lengths (oracle_dist only)

    @property
    def uncertainty(self) -> float:
        return float(self.pred.get("uncertainty", math.nan))


@dataclass
class WorkerView:
    """What a policy may know about a worker."""

    worker_id: str
    kind: str                              # "main" (the platform's device) or "offload" (a CPU worker)
    idle: bool
    free_at: float                         # predicted time the running batch ends (now when idle)
    max_batch: int
    service: Any                           # its ServiceModel


@dataclass
class Assignment:
    worker_id: str
    requests: list[Request]


class Policy:
    """Base policy: priority order, greedy batches of up to ``max_batch`` on the main worker.

    On the continuous-batching engine (:mod:`rtlm_lab.scheduler.engine`) a policy owns order and placement
    only: :meth:`key` ranks jobs each step (lower first), ``preemptive`` lets a waiting job displace a running
    one, :meth:`place` picks the engine for an arriving request; the engine's budgets are the platform's.
    """

    name = "policy"
    needs: tuple[str, ...] = ()
    preemptive = False
    pred_column: str | None = None          # the prediction (tokens) the policy believes in, if any
    token_s = 0.01                          # seconds per decoding step at typical load (set by the harness)

    PLACEMENTS = ("jsq", "round_robin", "predicted")
    default_placement = "jsq"

    def __init__(self, max_batch: int = 1, placement: str | None = None, **params: Any):
        if int(max_batch) < 1:
            raise UserError(f"policy.max_batch must be >= 1 (got {max_batch})")
        self.max_batch = int(max_batch)
        self.placement = str(placement or self.default_placement)
        if self.placement not in self.PLACEMENTS:
            raise UserError(f"policy.placement must be one of {', '.join(self.PLACEMENTS)} (got {placement!r})")
        self._rr = 0
        self.params = params

    def priority(self, req: Request, now: float) -> float:
        return req.arrival_s

    def order(self, queue: Sequence[Request], now: float) -> list[Request]:
        # ties broken by arrival then id: deterministic schedules
        return sorted(queue, key=lambda r: (self.priority(r, now), r.arrival_s, r.request_id))

    def select(self, queue: Sequence[Request], workers: Sequence[WorkerView], now: float
               ) -> tuple[list[Assignment], float | None]:
        out: list[Assignment] = []
        if not queue:
            return out, None
        ordered = self.order(queue, now)
        main = [w for w in workers if w.kind == "main"]
        out = self._offload_first(ordered, main, workers, now)
        for w in list(main):
            if not w.idle or not ordered:
                continue
            take = ordered[: min(self.max_batch, w.max_batch)]
            ordered = ordered[len(take):]
            out.append(Assignment(w.worker_id, take))
            main = self._busy_with(main, w, take, now)
        return out + self._offload(ordered, main, workers, now, skip={a.worker_id for a in out}), None

    # ------------------------------------------------------------------ static path: CPU offload workers
    offload = True                          # idle offload workers take work (every policy; rtlm_no_offload: no)
    typical_tokens = 32.0                   # reply tokens a placement assumes without a prediction of its own
                                            #   (set by the harness: the train pool's mean reply)

    def placement_tokens(self, req: Request) -> float:
        """Reply tokens this policy assumes for ``req`` when it picks a worker: its own prediction where it has
        one in tokens (``pred_column``), else the typical reply (no length knowledge)."""
        if self.pred_column and self.pred_column in req.pred:
            return max(1.0, float(req.pred[self.pred_column]))
        return max(1.0, float(self.typical_tokens))

    def _busy_with(self, main: list[WorkerView], w: WorkerView, batch: Sequence[Request], now: float
                   ) -> list[WorkerView]:
        """``main`` with ``w`` busy on ``batch`` (what the offload estimate must see)."""
        t = w.service.batch_time([r.n_input_tokens for r in batch], [self.placement_tokens(r) for r in batch])
        return [replace(m, idle=False, free_at=now + t) if m.worker_id == w.worker_id else m for m in main]

    def _offload_first(self, ordered: list[Request], main: list[WorkerView], workers: Sequence[WorkerView],
                       now: float) -> list[Assignment]:
        """Before an idle main worker takes its batch: each idle offload worker takes the head request (removed
        from ``ordered``) when it would finish it sooner than the idle main worker would alone (a small LM can
        decode faster per request on a CPU worker than on the GPU at batch 1): shortest expected delay does not
        wait for the main worker to be busy."""
        out: list[Assignment] = []
        idle_main = [m for m in main if m.idle]
        if not self.offload or not idle_main:
            return out
        m = idle_main[0]
        for w in workers:
            if w.kind != "offload" or not w.idle or not ordered:
                continue
            r = ordered[0]
            tok = self.placement_tokens(r)
            if w.service.isolated(r.n_input_tokens, tok) < m.service.isolated(r.n_input_tokens, tok):
                out.append(Assignment(w.worker_id, [ordered.pop(0)]))
        return out

    def _offload(self, ordered: list[Request], main: list[WorkerView], workers: Sequence[WorkerView], now: float,
                 skip: set[str] = frozenset()) -> list[Assignment]:
        """Each idle offload worker takes the first request, in this policy's order, that is expected to finish
        sooner there than on the main worker (queue and running batch included): shortest expected delay with
        the policy's own length knowledge (:meth:`placement_tokens`), the static path's counterpart of
        :meth:`place` on the continuous engine. RT-LM's strategic offloading is this rule with its predictions;
        the baselines get the same workers under it with the typical reply length (the oracles with the truth)."""
        out: list[Assignment] = []
        if not self.offload or not ordered:
            return out
        busy_main = [w for w in main if not w.idle] or main
        for w in workers:
            if w.kind != "offload" or not w.idle or not ordered or w.worker_id in skip:
                continue
            pick = self._offload_pick(ordered, busy_main, w, now)
            if pick is not None:
                ordered.remove(pick)
                out.append(Assignment(w.worker_id, [pick]))
        return out

    def _offload_pick(self, ordered: list[Request], main: Sequence[WorkerView], cpu: WorkerView, now: float):
        if not main:
            return None
        m = main[0]
        cap = max(1, min(self.max_batch, m.max_batch))
        backlog = 0.0
        for k, r in enumerate(ordered):
            pred = self.placement_tokens(r)
            # on the main worker: its running batch, then the batches of the requests ahead of r
            t_main = max(m.free_at, now) + backlog + m.service.batch_time([r.n_input_tokens] * min(cap, k + 1),
                                                                          [pred] * min(cap, k + 1))
            t_cpu = now + cpu.service.isolated(r.n_input_tokens, pred)
            if t_cpu < t_main:
                return r
            if (k + 1) % cap == 0:  # a full batch of requests ahead of the next ones
                backlog += m.service.batch_time([r.n_input_tokens] * cap, [pred] * cap)
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "max_batch": self.max_batch, "preemptive": self.preemptive,
                "placement": self.placement, **self.params}

    # ------------------------------------------------------------------ continuous-batching engine
    def key(self, job, now: float) -> float:
        """Rank of a job on the engine (lower runs first); defaults to the static :meth:`priority`."""
        return self.priority(job.req, now)

    def place(self, job, engines, now: float) -> str:
        """Engine for an arriving request (several engines: GPU replicas, CPU offload workers), by ``placement``:

        * ``jsq``: shortest expected delay, i.e. join-the-shortest-queue weighted by each engine's measured
          capacity ((outstanding + 1) / capacity); for identical engines it is JSQ;
        * ``round_robin``: the main engines (the replicas) in turn, blind to load; offload workers get none;
        * ``predicted``: the earliest predicted completion (each engine's step model, its queue included) with
          this policy's own length knowledge (:meth:`placement_tokens`): RT-LM's strategic placement.
        """
        if len(engines) == 1:
            return engines[0].id
        if self.placement == "round_robin":
            mains = [e for e in engines if e.kind == "main"] or list(engines)
            e = mains[self._rr % len(mains)]
            self._rr += 1
            return e.id
        if self.placement == "predicted":
            return min(engines, key=lambda e: (e.predicted_completion(job, now), e.id)).id
        return min(engines, key=lambda e: ((e.outstanding + 1) / max(getattr(e, "capacity_rps", 1.0), 1e-9),
                                           e.id)).id


class FCFS(Policy):
    name = "fcfs"


class SJFInput(Policy):
    name = "sjf_input"

    def priority(self, req, now):
        return req.n_input_tokens


class SJFProxy(Policy):
    name = "sjf_proxy"
    needs = ("pred_proxy",)
    pred_column = "pred_proxy"

    def priority(self, req, now):
        return req.pred["pred_proxy"]


class LTR(Policy):
    name = "ltr"
    needs = ("ltr_score",)

    def priority(self, req, now):
        return req.pred["ltr_score"]


class OracleSJF(Policy):
    name = "oracle_sjf"

    def priority(self, req, now):
        return req.true_tokens

    def placement_tokens(self, req):
        return max(1.0, float(req.true_tokens))


class OracleSRPT(Policy):
    """True remaining tokens, preemptive (shortest remaining processing time): on the same engine, the lower
    bound of what ordering can do for the mean response time."""

    name = "oracle_srpt"
    preemptive = True

    def priority(self, req, now):
        return req.true_tokens

    def placement_tokens(self, req):
        return max(1.0, float(req.true_tokens))

    def key(self, job, now):
        return job.req.true_tokens - job.generated


class RTLM(Policy):
    """RT-LM: uncertainty-aware priority with aging, dynamic consolidation, strategic CPU offloading.

    * priority = ``predicted isolated service time x (1 + uncertainty_weight x uncertainty)
      - aging x waited seconds`` (the uncertainty term pushes requests whose length is least certain back;
      aging lets every request reach the head eventually);
    * consolidation: the head request plus queued requests whose predicted lengths are within a factor
      ``length_window`` of the head's, up to ``max_batch``; when fewer than ``max_batch`` qualify and the head
      has waited less than ``batch_wait_s``, wait (bounded) for more to arrive;
    * offloading: an idle CPU worker takes the first request (priority order) whose predicted completion there
      beats its predicted completion on the main worker, the main worker's queue and running batch included.

    ``work_conserving=True`` (``policy=rtlm_wc``, our extension, not in the paper) keeps consolidation but never
    idles the main worker while the queue holds work it could start: it waits for a fuller batch only when
    every queued request is already in the head's group, and then at most ``wait_fraction`` of the head's
    predicted service time (capped by ``batch_wait_s``): a 20 ms request is not held 50 ms for company.
    """

    name = "rtlm"
    needs = ("pred_rtlm", "uncertainty")
    pred_column = "pred_rtlm"
    default_placement = "predicted"

    def __init__(self, max_batch: int = 8, uncertainty_weight: float = 0.5, aging: float = 0.02,
                 consolidation: bool = True, length_window: float = 2.0, batch_wait_s: float = 0.05,
                 offload: bool = True, work_conserving: bool = False, wait_fraction: float = 0.25,
                 name: str | None = None, **params: Any):
        super().__init__(max_batch=max_batch, **params)
        if name:
            self.name = name
        if length_window < 1:
            raise UserError(f"policy.length_window must be >= 1 (got {length_window})")
        if aging < 0 or batch_wait_s < 0 or uncertainty_weight < 0:
            raise UserError("policy.aging, policy.batch_wait_s and policy.uncertainty_weight must be >= 0")
        self.uncertainty_weight = float(uncertainty_weight)
        self.aging = float(aging)
        self.consolidation = bool(consolidation)
        self.length_window = float(length_window)
        self.batch_wait_s = float(batch_wait_s)
        self.offload = bool(offload)
        if not self.offload and self.placement == "predicted":  # strategic placement is part of offloading:
            self.placement = "jsq"                                # without it, RT-LM places as FCFS does
        if not 0 <= wait_fraction:
            raise UserError(f"policy.wait_fraction must be >= 0 (got {wait_fraction})")
        self.work_conserving = bool(work_conserving)
        self.wait_fraction = float(wait_fraction)
        self._main_service = None

    def describe(self):
        return {**super().describe(), "uncertainty_weight": self.uncertainty_weight, "aging": self.aging,
                "consolidation": self.consolidation, "length_window": self.length_window,
                "batch_wait_s": self.batch_wait_s, "offload": self.offload,
                "work_conserving": self.work_conserving, "wait_fraction": self.wait_fraction}

    def predicted_service(self, req: Request, service) -> float:
        return service.isolated(req.n_input_tokens, max(1.0, req.pred.get("pred_rtlm", 1.0)))

    def priority(self, req, now):
        s = self.predicted_service(req, self._main_service) if self._main_service else req.pred["pred_rtlm"]
        u = req.uncertainty if math.isfinite(req.uncertainty) else 0.0
        return s * (1.0 + self.uncertainty_weight * u) - self.aging * max(0.0, now - req.arrival_s)

    def key(self, job, now):
        """Continuous engine: predicted *remaining* service seconds x (1 + w x uncertainty) - aging x waited s
        (non-preemptive: it orders admissions; consolidation is what iteration-level batching does anyway)."""
        rem = max(1.0, job.req.pred.get("pred_rtlm", 1.0) - job.generated)
        u = job.req.uncertainty if math.isfinite(job.req.uncertainty) else 0.0
        return rem * self.token_s * (1.0 + self.uncertainty_weight * u) - self.aging * max(0.0, now - job.req.arrival_s)


    def _close(self, a: Request, b: Request) -> bool:
        pa, pb = max(1.0, a.pred["pred_rtlm"]), max(1.0, b.pred["pred_rtlm"])
        return max(pa, pb) / min(pa, pb) <= self.length_window

    def select(self, queue, workers, now):
        out: list[Assignment] = []
        if not queue:
            return out, None
        main = [w for w in workers if w.kind == "main"]
        if main:
            self._main_service = main[0].service
        ordered = self.order(queue, now)
        out = self._offload_first(ordered, main, workers, now)
        wake: float | None = None
        for w in main:
            if not w.idle or not ordered:
                continue
            cap = min(self.max_batch, w.max_batch)
            head = ordered[0]
            if self.consolidation and cap > 1:
                group = [r for r in ordered if self._close(head, r)][:cap]
                # bounded wait for a fuller batch; compared as the wake time itself (not now - arrival <
                # batch_wait_s, which float rounding can keep true at the wake instant: a lost wake-up)
                wait_s = self.batch_wait_s
                if self.work_conserving:
                    # other queued work could start now: do not hold the worker idle for company
                    wait_s = 0.0 if len(group) < len(ordered) else min(
                        wait_s, self.wait_fraction * self.predicted_service(head, w.service))
                if len(group) < cap and head.arrival_s + wait_s > now:
                    wake = head.arrival_s + wait_s
                    continue
            else:
                group = ordered[:cap]
            taken = {id(r) for r in group}
            ordered = [r for r in ordered if id(r) not in taken]
            out.append(Assignment(w.worker_id, group))
            main = self._busy_with(main, w, group, now)  # the offload estimate must see it busy
        return out + self._offload(ordered, main, workers, now, skip={a.worker_id for a in out}), wake


class LMStatePolicy(Policy):
    """Our extension (issue 15): the served LM predicts its own reply length, and the engine runs shortest
    predicted remaining work first, preemptively, with aging.

    * **prefill first**: a request whose prompt has not been prefilled ranks ahead of everything (as
      transformers' ``PrefillFirstScheduler`` does); its prefill, which the engine runs anyway, gives the
      prediction (:class:`~rtlm_lab.scheduler.lmprobe.StateProbe`: a probe of the prompt's hidden states) before
      its decode order is chosen;
    * **refinement**: every ``refine_every`` generated tokens the decoding step's state (plus the repetition
      features of the tokens so far) re-predicts the remaining tokens;
    * key = predicted remaining tokens x the step time - ``aging`` x seconds since arrival (aging as RT-LM's);
      preemptive (a pause keeps the KV cache, as for ``oracle_srpt``).

    The probe's cost is inside the engine's steps (on the clock). Real slot engine only (``mode=real``,
    ``platform.engine.backend=slots``): the prediction is read from that engine's forward passes.
    """

    name = "lmstate"
    preemptive = True
    uses_lm_state = True
    pred_column = "pred_lmstate"

    def __init__(self, aging: float = 0.02, refine_every: int = 8, refine_ks=(8, 16), train_profile=None,
                 probe: str = "ridge", train_n=None, name: str | None = None, max_batch: int = 1, **params: Any):
        super().__init__(max_batch=max_batch, **params)
        if name:
            self.name = name
        if float(aging) < 0 or int(refine_every) < 0:
            raise UserError("policy.aging and policy.refine_every must be >= 0")
        self.aging, self.refine_every = float(aging), int(refine_every)
        self.probe_params = {"refine_every": int(refine_every), "refine_ks": list(refine_ks or []),
                             "train_profile": train_profile, "probe": probe, "train_n": train_n}

    def describe(self):
        return {**super().describe(), "aging": self.aging, **self.probe_params}

    def key(self, job, now):
        rem = job.predicted_remaining()
        if not math.isfinite(rem):
            return -math.inf  # prefill first: its prefill gives the prediction
        return max(1.0, rem) * self.token_s - self.aging * max(0.0, now - job.req.arrival_s)


def _overrun_mean(value: float | None) -> float | None:
    """``policy.overrun_mean`` checked: tokens > 0, or None (the distribution's own mean)."""
    if value is not None and not float(value) > 0:
        raise UserError(f"policy.overrun_mean must be > 0 or null (got {value})")
    return None if value is None else float(value)


class _SizeDistributionPolicy(Policy):
    """Base of the distribution-aware policies (DESIGN.md 1f): each request carries its predicted output-length
    quantiles in ``req.pred["pred_quantiles"]`` (a tuple of tokens at ``levels``, default
    :data:`rtlm_lab.distmetrics.DEFAULT_LEVELS`: what :class:`~rtlm_lab.scheduler.predictions.Predictors` puts
    there), turned into a discrete distribution by the midpoint rule
    (:meth:`~rtlm_lab.scheduler.gittins.DiscreteSize.from_quantiles`, once per request and cached); the job's
    attained service is ``job.generated`` tokens. Preemptive (a pause keeps the KV cache, as ``oracle_srpt``).
    ``overrun_mean`` (tokens, null: the distribution's mean) is the remaining size assumed for a job that has
    outlived every predicted quantile (:mod:`rtlm_lab.scheduler.gittins`). No aging: these orders are the
    index rules themselves. A request without ``pred_quantiles`` is a one-line :class:`UserError`."""

    needs = ("pred_quantiles",)
    preemptive = True
    pred_column = None                      # the prediction is a distribution, not one token count

    def __init__(self, levels=None, overrun_mean: float | None = None, name: str | None = None,
                 max_batch: int = 1, **params: Any):
        super().__init__(max_batch=max_batch, **params)
        from rtlm_lab.distmetrics import DEFAULT_LEVELS, check_levels

        if name:
            self.name = name
        try:
            self.levels = tuple(float(v) for v in check_levels(DEFAULT_LEVELS if levels is None else levels))
        except ValueError as exc:
            raise UserError(f"policy.levels: {exc}") from None
        self.overrun_mean = _overrun_mean(overrun_mean)
        self._dists: dict[tuple[str, tuple], Any] = {}
        self._keys: dict[str, tuple[int, Any, float]] = {}   # request id -> (age, quantiles, key)

    def describe(self):
        return {**super().describe(), "levels": list(self.levels), "overrun_mean": self.overrun_mean}

    def dist(self, req: Request):
        """The request's :class:`~rtlm_lab.scheduler.gittins.DiscreteSize` (cached per request and quantiles)."""
        from rtlm_lab.scheduler.gittins import DiscreteSize

        q = req.pred.get("pred_quantiles")
        if q is None:
            raise UserError(f"policy {self.name} needs the predicted quantiles req.pred['pred_quantiles'] "
                            f"(request {req.request_id} has none; predictions.Predictors provides them)")
        q = tuple(q)
        key = (req.request_id, q)
        d = self._dists.get(key)
        if d is None:
            if len(q) != len(self.levels):
                raise UserError(f"request {req.request_id}: {len(q)} predicted quantiles for the policy's "
                                f"{len(self.levels)} levels {list(self.levels)}")
            d = self._dists[key] = DiscreteSize.from_quantiles(self.levels, q, self.overrun_mean)
        return d

    def placement_tokens(self, req: Request) -> float:
        """Its own length knowledge for placement: the predicted distribution's mean."""
        return max(1.0, self.dist(req).mean)

    def _rank(self, dist, age: int) -> float:
        raise NotImplementedError

    def key(self, job, now):
        """The rank at the job's attained service (``job.generated``); cached while the job does not advance, so
        a long waiting queue costs a dictionary lookup per job and step."""
        q = job.req.pred.get("pred_quantiles")
        c = self._keys.get(job.req.request_id)
        if c is not None and c[0] == job.generated and c[1] is q:
            return c[2]
        k = self._rank(self.dist(job.req), job.generated)
        self._keys[job.req.request_id] = (job.generated, q, k)
        return k


class Gittins(_SizeDistributionPolicy):
    """Our extension: the Gittins index of each request's predicted length distribution at its attained
    service, ``G(a) = sup_D P(R <= D) / E[min(R, D)]``, ``R = S - a | S > a`` (:mod:`rtlm_lab.scheduler.gittins`);
    the largest index runs first (key = ``-G(job.generated)``), preemptive. Point masses give SRPT, a decreasing
    hazard LAS."""

    name = "gittins"

    def priority(self, req, now):
        return -self.dist(req).index(0.0)

    def _rank(self, dist, age):
        return -dist.index(age)


class SRPTExpected(_SizeDistributionPolicy):
    """Our extension (the Gittins policy's ablation): the expected remaining tokens of each request's predicted
    distribution, ``E[S - a | S > a]`` at ``a = job.generated``, smallest first, preemptive: SRPT on the
    conditional mean, blind to the distribution's shape."""

    name = "srpt_expected"

    def priority(self, req, now):
        return self.dist(req).expected_remaining(0.0)

    def _rank(self, dist, age):
        return dist.expected_remaining(age)


class OracleDist(Gittins):
    """The honest lower bound under sampled decoding (issue 34): the Gittins index of each prompt's *true*
    length distribution (its ``K`` samples in the spread profile, ``req.true_dist``, each of weight ``1/K``),
    not the sample this request will draw (``oracle_srpt`` knows that). Needs a spread profile as the workload
    (``profile=<spread.parquet>``: its ``lengths`` column)."""

    name = "oracle_dist"
    needs = ()

    def dist(self, req: Request):
        from rtlm_lab.scheduler.gittins import DiscreteSize

        d = self._dists.get((req.request_id, ()))
        if d is None:
            if not req.true_dist:
                raise UserError(f"policy oracle_dist needs each prompt's sampled lengths (request {req.request_id} "
                                "has none): serve a spread profile, profile=<rtlm-spread's spread.parquet>")
            import numpy as np

            vals, counts = np.unique(np.asarray(req.true_dist, dtype=float), return_counts=True)
            d = self._dists[(req.request_id, ())] = DiscreteSize(vals, counts / counts.sum(), self.overrun_mean)
        return d


BASELINES = {"fcfs": FCFS, "sjf_input": SJFInput, "sjf_proxy": SJFProxy, "ltr": LTR, "oracle_sjf": OracleSJF,
             "oracle_srpt": OracleSRPT}
ABLATIONS = {
    "rtlm": {},
    "rtlm_no_uncertainty": {"uncertainty_weight": 0.0},
    "rtlm_no_aging": {"aging": 0.0},
    "rtlm_no_consolidation": {"consolidation": False},
    "rtlm_no_offload": {"offload": False},
    "rtlm_batch1": {"max_batch": 1},
    "rtlm_wc": {"work_conserving": True},  # extension: work-conserving consolidation (see RTLM)
}
class GittinsLMState(LMStatePolicy):
    """Our extension (issue 34): the Gittins index over the served LM's *own* length distribution. The
    LM-state probe's point prediction (prefill, then each refinement) becomes a distribution of the total length
    by the probe's held-out residual quantiles (:meth:`~rtlm_lab.scheduler.lmprobe.StateProbe.quantiles`: a
    band of constant width in log space, refitted per refinement step); the job with the largest index at its
    attained service ``job.generated`` runs first (key = ``-G(a)``, :mod:`rtlm_lab.scheduler.gittins`),
    preemptive, prefill first as ``lmstate``. No aging (the index is the rule itself). Its cost is
    ``lmstate``'s (the same probe inside the engine's steps) plus a host-side index per job and step, cached
    while a job neither advances nor is re-predicted. Real kv/slots engine only, as ``lmstate``."""

    name = "gittins_lmstate"

    def __init__(self, overrun_mean: float | None = None, **params: Any):
        params.pop("aging", None)
        super().__init__(aging=0.0, **params)
        self.overrun_mean = _overrun_mean(overrun_mean)
        self.probe = None
        self._dists: dict[str, tuple[int, float, Any]] = {}     # request id -> (rem_at, rem_pred, distribution)
        self._keys: dict[str, tuple[int, float, int, float]] = {}

    def describe(self):
        return {**super().describe(), "overrun_mean": self.overrun_mean}

    def attach_probe(self, probe) -> None:
        """The fitted probe whose residual quantiles shape each prediction (the harness calls this)."""
        self.probe = probe

    def dist(self, job):
        """The job's :class:`~rtlm_lab.scheduler.gittins.DiscreteSize` of its total length, from its latest
        prediction (cached per prediction)."""
        from rtlm_lab.scheduler.gittins import DiscreteSize

        c = self._dists.get(job.rid)
        if c is not None and c[0] == job.rem_at and c[1] == job.rem_pred:
            return c[2]
        if self.probe is None:
            raise UserError("policy gittins_lmstate needs the LM-state probe (the harness attaches it)")
        q = self.probe.quantiles(job.rem_pred, job.rem_at)
        d = DiscreteSize.from_quantiles(self.probe.levels, q, self.overrun_mean)
        self._dists[job.rid] = (job.rem_at, job.rem_pred, d)
        return d

    def key(self, job, now):
        if not math.isfinite(job.rem_pred):
            return -math.inf  # prefill first: its prefill gives the prediction
        c = self._keys.get(job.rid)
        if c is not None and c[0] == job.rem_at and c[1] == job.rem_pred and c[2] == job.generated:
            k = c[3]
        else:
            k = -self.dist(job).index(job.generated)
            self._keys[job.rid] = (job.rem_at, job.rem_pred, job.generated, k)
        return k


EXTENSIONS = {"lmstate": {}, "lmstate_no_refine": {"refine_every": 0}}
LM_STATE_DISTRIBUTIONAL = {"gittins_lmstate": GittinsLMState}
DISTRIBUTIONAL = {"gittins": Gittins, "srpt_expected": SRPTExpected,  # read req.pred["pred_quantiles"]
                  "oracle_dist": OracleDist}                          # reads req.true_dist (a spread profile)
POLICIES = tuple(BASELINES) + tuple(ABLATIONS) + tuple(EXTENSIONS) + tuple(LM_STATE_DISTRIBUTIONAL) + \
    tuple(DISTRIBUTIONAL)


def make_policy(name: str, params: Mapping[str, Any] | None = None) -> Policy:
    """A policy by name (``conf/policy/<name>.yaml`` holds its parameters)."""
    params = {k: v for k, v in dict(params or {}).items() if k not in ("name", "kind")}
    if name in BASELINES:
        for k in ("uncertainty_weight", "aging", "consolidation", "length_window", "batch_wait_s", "offload"):
            params.pop(k, None)
        return BASELINES[name](**params)
    if name in ABLATIONS:
        return RTLM(name=name, **{**params, **ABLATIONS[name]})
    if name in EXTENSIONS:
        for k in ("uncertainty_weight", "consolidation", "length_window", "batch_wait_s", "offload"):
            params.pop(k, None)
        return LMStatePolicy(name=name, **{**params, **EXTENSIONS[name]})
    if name in LM_STATE_DISTRIBUTIONAL:
        for k in ("uncertainty_weight", "consolidation", "length_window", "batch_wait_s", "offload", "levels"):
            params.pop(k, None)
        return LM_STATE_DISTRIBUTIONAL[name](name=name, **params)
    if name in DISTRIBUTIONAL:
        for k in ("uncertainty_weight", "aging", "consolidation", "length_window", "batch_wait_s", "offload"):
            params.pop(k, None)
        return DISTRIBUTIONAL[name](name=name, **params)
    raise UserError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
