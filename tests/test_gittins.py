"""Distribution-aware scheduling: the Gittins index (pure functions, hand-computed), the ``gittins`` and
``srpt_expected`` policies on the simulated engine (a controlled clock: 1 s a step), the distributional metrics
and the quantile length predictor (coverage on synthetic heteroscedastic data, run-time recalibration)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rtlm_lab import distmetrics as DM
from rtlm_lab.errors import UserError
from rtlm_lab.scheduler.engine import Engine, Job, PredictorServer, SimBackend, StepModel, VirtualClock, serve
from rtlm_lab.scheduler.gittins import (DiscreteSize, expected_remaining, gittins_from_quantiles, gittins_index,
                                        hazard, index_curve)
from rtlm_lab.scheduler.policies import Request, make_policy

UNIT = StepModel(a=1.0)  # every step takes 1 s: a job of n tokens alone finishes n s after it starts


# ============================================================================================ the index
def test_gittins_index_by_hand_two_points():
    # S = 2 or 10 with probability 1/2 each.
    # a = 0: D = 2  -> P(R <= 2) = 1/2, E[min(R, 2)] = 1/2*2 + 1/2*2 = 2      -> 0.25
    #        D = 10 -> P(R <= 10) = 1,  E[min(R, 10)] = 1/2*2 + 1/2*10 = 6    -> 1/6
    #        G(0) = max = 0.25 (the quantum "up to 2 tokens" is the best bet)
    # a = 1: R = 1 or 9 (1/2 each): D = 1 -> (1/2) / 1 = 0.5; D = 9 -> 1 / (1/2*1 + 1/2*9) = 0.2 -> G(1) = 0.5
    # a = 2: the job was not short: R = 8 surely -> G(2) = 1/8
    # a = 5: R = 5 surely -> 1/5
    s, p = [2, 10], [0.5, 0.5]
    assert gittins_index(s, p, 0) == pytest.approx(0.25)
    assert gittins_index(s, p, 1) == pytest.approx(0.5)
    assert gittins_index(s, p, 2) == pytest.approx(1 / 8)
    assert gittins_index(s, p, 5) == pytest.approx(1 / 5)
    # probabilities need not be normalised, nor the support sorted
    assert gittins_index([10, 2], [3, 3], 1) == pytest.approx(0.5)


def test_gittins_index_by_hand_three_points_and_the_sup_is_at_a_support_point():
    # S in {1, 3, 6} with p = (0.2, 0.5, 0.3).
    # a = 0: D = 1 -> 0.2 / (0.2*1 + 0.5*1 + 0.3*1) = 0.2
    #        D = 3 -> 0.7 / (0.2*1 + 0.5*3 + 0.3*3) = 0.7 / 2.6 = 0.26923
    #        D = 6 -> 1.0 / (0.2*1 + 0.5*3 + 0.3*6) = 1 / 3.5   = 0.28571  -> G(0) = 2/7
    # a = 2: S > 2 leaves {3, 6} with weights 0.5, 0.3 (R = 1 or 4):
    #        D = 1 -> 0.5 / (0.5*1 + 0.3*1) = 0.625;  D = 4 -> 0.8 / (0.5*1 + 0.3*4) = 0.8 / 1.7 -> G(2) = 0.625
    s, p = [1, 3, 6], [0.2, 0.5, 0.3]
    assert gittins_index(s, p, 0) == pytest.approx(2 / 7)
    assert gittins_index(s, p, 2) == pytest.approx(0.625)
    # brute force over a fine grid of quanta D: never above the exact value, and reaches it at a support point
    for a in (0.0, 0.5, 2.0, 4.0):
        live = [(si - a, pi) for si, pi in zip(s, p) if si > a]
        tot = sum(pi for _, pi in live)

        def ratio(D):
            num = sum(pi for r, pi in live if r <= D) / tot
            den = sum(pi * min(r, D) for r, pi in live) / tot
            return num / den

        grid = np.linspace(0.01, 10, 2000)
        exact = gittins_index(s, p, a)
        assert max(ratio(D) for D in grid) <= exact + 1e-12
        assert max(ratio(r) for r, _ in live) == pytest.approx(exact)


def test_point_mass_is_srpt():
    # a point mass at s: R = s - a surely, G = 1 / (s - a); the largest index is the smallest remaining size
    for s in (1, 7, 50):
        for a in range(s):
            assert gittins_index([s], [1.0], a) == pytest.approx(1 / (s - a))
            assert expected_remaining([s], [1.0], a) == pytest.approx(s - a)
    jobs = {"a": (30, 4), "b": (12, 0), "c": (9, 5), "d": (100, 95)}  # (size, attained)
    by_index = sorted(jobs, key=lambda k: -gittins_index([jobs[k][0]], [1], jobs[k][1]))
    by_srpt = sorted(jobs, key=lambda k: jobs[k][0] - jobs[k][1])
    assert by_index == by_srpt == ["c", "d", "b", "a"]


def _dhr(n: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    """A decreasing-hazard length distribution on 1..n: 70% geometric with mean 2, 30% geometric with mean 60
    (a discrete hyperexponential), truncated at n."""
    t = np.arange(1, n + 1)
    p = 0.7 * 0.5 * 0.5 ** (t - 1) + 0.3 * (1 / 60) * (1 - 1 / 60) ** (t - 1)
    return t.astype(float), p / p.sum()


def test_decreasing_hazard_gives_las_older_jobs_rank_lower():
    s, p = _dhr()
    h = hazard(s, p)
    assert np.all(np.diff(h[:300]) <= 1e-12)  # the hazard does decrease (checked, not assumed)
    g = index_curve(s, p, range(0, 120))
    assert np.all(np.diff(g) <= 1e-12) and g[0] > 2 * g[20]  # the index falls with age
    # three jobs with the same distribution: the least attained service first (LAS)
    ages = {"old": 40, "mid": 5, "new": 0}
    assert sorted(ages, key=lambda k: -gittins_index(s, p, ages[k])) == ["new", "mid", "old"]
    # an increasing hazard (here: a narrow distribution) gives the opposite: the job closest to done first
    s2, p2 = [9.0, 10.0, 11.0], [0.25, 0.5, 0.25]
    assert sorted(ages, key=lambda k: -gittins_index(s2, p2, min(ages[k], 8))) == ["old", "mid", "new"]


def test_outliving_the_distribution_falls_back_to_the_overrun_mean():
    s, p = [2, 10], [0.5, 0.5]
    assert gittins_index(s, p, 10) == pytest.approx(1 / 6)  # memoryless with mean E[S] = 6: index 1/6
    assert expected_remaining(s, p, 12) == pytest.approx(6)
    assert gittins_index(s, p, 10, overrun_mean=40) == pytest.approx(1 / 40)
    with pytest.raises(ValueError):
        gittins_index([0, 3], [0.5, 0.5])
    with pytest.raises(ValueError):
        gittins_index([1, 3], [0.5])


def test_quantiles_become_the_midpoint_rule_distribution():
    lv = DM.DEFAULT_LEVELS
    assert DM.level_masses(lv) == pytest.approx([0.075, 0.1, 0.2, 0.25, 0.2, 0.1, 0.075])
    s, p = DM.quantiles_to_discrete(lv, [3, 5, 10, 20, 20, 80, 120])  # equal quantiles merge
    assert list(s) == [3, 5, 10, 20, 80, 120] and p == pytest.approx([0.075, 0.1, 0.2, 0.45, 0.1, 0.075])
    d = DiscreteSize.from_quantiles(lv, [120, 80, 20, 20, 10, 5, 3])  # crossing quantiles are sorted first
    assert d.s == list(s) and d.p == pytest.approx(list(p))
    # all quantiles equal: a point mass (SRPT); below 1 token is raised to 1
    assert gittins_from_quantiles(lv, [7] * 7, age=3) == pytest.approx(1 / 4)
    assert gittins_from_quantiles(lv, [0] * 7) == pytest.approx(1.0)
    # two levels at 0.25 / 0.75 carry 1/2 each
    assert gittins_from_quantiles((0.25, 0.75), [2, 10]) == pytest.approx(0.25)


# ============================================================================================ policies
def _reqs(spec):
    """``[(id, arrival_s, true_tokens, predicted quantiles)]`` -> requests (1 prompt token each)."""
    return [Request(request_id=i, text=f"text {i}", context="", arrival_s=t, n_input_tokens=1, true_tokens=n,
                    pred={"pred_quantiles": tuple(float(v) for v in q)}) for i, t, n, q in spec]


def _serve(spec, policy, params=None, max_seqs=1):
    clock = VirtualClock()
    pol = make_policy(policy, params or {})
    eng = Engine("e0", SimBackend(UNIT), pol, max_seqs=max_seqs, max_batch_tokens=4096, step_model=UNIT)
    rs = _reqs(spec)
    jobs, _ = serve(rs, pol, [eng], clock, PredictorServer(rs, (), clock))
    return {j.rid: j for j in jobs}


def _point(n):
    return (n,) * 7


def test_gittins_on_point_masses_serves_exactly_as_oracle_srpt():
    for spec in ([("a", 0.0, 3, _point(3)), ("b", 0.0, 1, _point(1)), ("c", 0.0, 2, _point(2))],
                 [("long", 0.0, 5, _point(5)), ("short", 1.5, 1, _point(1))],
                 [(f"r{i}", 0.7 * i, 1 + (7 * i) % 5, _point(1 + (7 * i) % 5)) for i in range(12)]):
        srpt = _serve([(i, t, n, q) for i, t, n, q in spec], "oracle_srpt")
        for pol in ("gittins", "srpt_expected"):
            got = _serve(spec, pol)
            assert {k: j.finish_s for k, j in got.items()} == {k: j.finish_s for k, j in srpt.items()}, pol
    # the hand example of oracle_srpt (tests/test_engine.py): b ends at 1, c at 3, a at 6; long is preempted once
    got = _serve([("a", 0.0, 3, _point(3)), ("b", 0.0, 1, _point(1)), ("c", 0.0, 2, _point(2))], "gittins")
    assert {k: j.finish_s for k, j in got.items()} == {"b": 1.0, "c": 3.0, "a": 6.0}
    got = _serve([("long", 0.0, 5, _point(5)), ("short", 1.5, 1, _point(1))], "gittins")
    assert got["short"].finish_s == 3.0 and got["long"].finish_s == 6.0 and got["long"].steps_paused == 1


def test_gittins_bets_on_the_short_branch_where_expected_remaining_does_not():
    # A: 1 or 100 tokens, 1/2 each (levels 0.25 / 0.75: 1/2 of the mass each): E[S] = 50.5, G(0) = 0.5
    # B: 10 tokens surely: E = 10, G = 0.1. Both arrive at 0, one row per step.
    lv = {"levels": [0.25, 0.75]}
    short_a = [("A", 0.0, 1, (1, 100)), ("B", 0.0, 10, (10, 10))]
    g = _serve(short_a, "gittins", lv)
    e = _serve(short_a, "srpt_expected", lv)
    # gittins: A first (index 0.5 > 0.1), it is short: A ends at 1, B at 11 (mean 6)
    assert (g["A"].finish_s, g["B"].finish_s) == (1.0, 11.0)
    # srpt_expected: B first (10 < 50.5): B ends at 10, A at 11 (mean 10.5)
    assert (e["B"].finish_s, e["A"].finish_s) == (10.0, 11.0)
    # A is long: after its first token its index is 1/99 < 1/10, so B takes over; A finishes last
    long_a = [("A", 0.0, 100, (1, 100)), ("B", 0.0, 10, (10, 10))]
    g = _serve(long_a, "gittins", lv)
    assert g["B"].finish_s == 11.0 and g["A"].finish_s == 110.0 and g["A"].steps_paused == 10


def test_gittins_with_a_decreasing_hazard_lets_a_new_job_preempt_an_old_one():
    # both jobs carry the same decreasing-hazard prediction (1 token w.p. ~0.5, up to 60): "old" has run
    # 3 tokens when "new" arrives at 3.5; its index has fallen below a fresh job's, so "new" runs (LAS)
    q = (1, 1, 1, 2, 8, 30, 60)
    assert gittins_from_quantiles(DM.DEFAULT_LEVELS, q, 4) < gittins_from_quantiles(DM.DEFAULT_LEVELS, q, 0)
    spec = [("old", 0.0, 8, q), ("new", 3.5, 1, q)]
    g = _serve(spec, "gittins")
    assert g["new"].finish_s == 5.0 and g["old"].finish_s == 9.0 and g["old"].steps_paused == 1
    f = _serve(spec, "fcfs")
    assert f["old"].finish_s == 8.0 and f["new"].finish_s == 9.0
    # a narrow (increasing-hazard) prediction keeps the old job running
    n = _serve([("old", 0.0, 8, (7, 8, 8, 8, 8, 8, 9)), ("new", 3.5, 1, (7, 8, 8, 8, 8, 8, 9))], "gittins")
    assert n["old"].finish_s == 8.0 and n["new"].finish_s == 9.0 and n["old"].steps_paused == 0


def test_policy_keys_and_errors():
    pol = make_policy("gittins", {"max_batch": 4, "aging": 0.1})  # shared keys of other policies are ignored
    assert pol.preemptive and pol.needs == ("pred_quantiles",) and pol.describe()["levels"] == list(DM.DEFAULT_LEVELS)
    r = _reqs([("x", 0.0, 5, (2, 2, 2, 2, 10, 10, 10))])[0]
    j = Job(req=r)
    # midpoint masses: 2 w.p. 0.625, 10 w.p. 0.375; G(0) = max(0.625/2, 1/(0.625*2 + 0.375*10)) = 0.3125
    assert pol.key(j, 0.0) == pytest.approx(-0.3125)
    j.generated = 3  # past 2: R = 7 surely
    assert pol.key(j, 0.0) == pytest.approx(-1 / 7)
    e = make_policy("srpt_expected")
    assert e.key(Job(req=r), 0.0) == pytest.approx(0.625 * 2 + 0.375 * 10)
    assert e.placement_tokens(r) == pytest.approx(5.0) and e.priority(r, 0.0) == pytest.approx(5.0)
    with pytest.raises(UserError, match="pred_quantiles"):
        pol.key(Job(req=Request("y", "t", "", 0.0, 1, 1, pred={})), 0.0)
    with pytest.raises(UserError, match="levels"):
        pol.key(Job(req=_reqs([("z", 0.0, 1, (1, 2))])[0]), 0.0)
    with pytest.raises(UserError):
        make_policy("gittins", {"levels": [0.5, 0.2]})
    with pytest.raises(UserError):
        make_policy("srpt_expected", {"overrun_mean": 0})


# ============================================================================================ metrics
def test_distributional_metrics_by_hand():
    lv = (0.25, 0.75)  # midpoint masses 1/2, 1/2
    y = np.array([4.0])
    Q = np.array([[2.0, 10.0]])
    # pinball: level 0.25 at q=2: 0.25*(4-2) = 0.5; level 0.75 at q=10: (0.75-1)*(4-10) = 1.5
    assert DM.pinball_loss(y, Q, lv) == pytest.approx([0.5, 1.5])
    # CRPS of {2, 10} (1/2 each) at 4: E|X-y| = (2 + 6)/2 = 4; E|X-X'| = 2 * 1/4 * 8 = 4 -> 4 - 2 = 2
    assert DM.crps(y, Q, lv) == pytest.approx([2.0])
    # a point mass: CRPS = absolute error
    assert DM.crps([3.0, 9.0], [[5.0, 5.0], [5.0, 5.0]], lv) == pytest.approx([2.0, 4.0])
    assert DM.interval_coverage([1, 2, 3, 4], [2, 2, 2, 2], [3, 3, 3, 3]) == 0.5  # endpoints included
    # PIT: strictly between quantiles -> linear; 6 is halfway from 2 to 10 -> halfway from 0.25 to 0.75
    assert DM.pit([6.0], Q, lv) == pytest.approx([0.5])
    assert 0.0 <= DM.pit([1.0], Q, lv)[0] <= 0.25 and 0.75 <= DM.pit([11.0], Q, lv)[0] <= 1.0
    row = DM.score_quantiles(np.array([4.0, 6.0, 8.0]), np.tile([[2.0, 10.0]], (3, 1)), lv)
    assert row["crps"] > 0 and math.isnan(row["cover90"]) and row["cover50"] == 1.0


def test_pit_of_the_true_quantiles_is_uniform_and_tied_quantiles_randomize():
    rng = np.random.default_rng(0)
    lv = np.array(DM.DEFAULT_LEVELS)
    from scipy.stats import norm

    mu = rng.uniform(0, 5, 4000)
    y = mu + rng.standard_normal(4000)
    Q = mu[:, None] + norm.ppf(lv)[None, :]
    u = DM.pit(y, Q, lv, seed=1)
    hist, _ = np.histogram(u, bins=10, range=(0, 1))
    assert np.all(np.abs(hist / len(y) - 0.1) < 0.025)
    row = DM.score_quantiles(y, Q, lv)
    assert abs(row["cover90"] - 0.9) < 0.02 and abs(row["cover50"] - 0.5) < 0.03
    # every reply at a cap that all quantiles equal: PIT uniform over [0, 1] (not a spike at 1)
    u = DM.pit(np.full(2000, 64.0), np.full((2000, 7), 64.0), lv, seed=0)
    assert 0.45 < u.mean() < 0.55


# ============================================================================================ predictor
def _hetero(n, seed):
    """Lengths whose log spread grows with x1 (heteroscedastic) and whose log mean grows with x0."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 1, (n, 3))
    mu, sd = np.log(20) + 1.5 * X[:, 0], 0.15 + 0.8 * X[:, 1]
    return X, np.round(np.exp(mu + sd * rng.standard_normal(n))) + 1


@pytest.mark.parametrize("model", ["linear", "hgb"])
def test_quantile_predictor_coverage_is_near_nominal_on_heteroscedastic_data(model):
    """linear: the fitted quantiles as they are. hgb: boosted quantile trees fit their training rows too
    closely (out of sample they cover ~0.82-0.88 here), so, as split-conformal quantile regression does, 500
    calibration rows go through ``update`` first."""
    from threadpoolctl import threadpool_limits

    from rtlm_lab.regressor.distribution import QuantileLengthPredictor

    X, y = _hetero(3000, 0)
    with threadpool_limits(1):  # OpenMP threads on a shared 2-core machine only slow the boosting down
        if model == "hgb":
            p = QuantileLengthPredictor(model="hgb", min_samples_leaf=40, max_iter=50, learning_rate=0.1,
                                        recal_window=500).fit(X[:1000], y[:1000])
            p.update(X[1000:1500], y[1000:1500])
        else:
            p = QuantileLengthPredictor(model="linear").fit(X[:1500], y[:1500])
        Q = p.predict_quantiles(X[1500:])
    assert Q.shape == (1500, 7) and np.all(np.diff(Q, axis=1) >= 0) and np.all(Q >= 0)
    row = DM.score_quantiles(y[1500:], Q, p.levels_)
    assert 0.85 <= row["cover90"] <= 0.95, row
    assert 0.42 <= row["cover50"] <= 0.58, row
    # the interval follows the spread: wider where x1 is large
    wide, narrow = X[1500:, 1] > 0.7, X[1500:, 1] < 0.3
    w90 = Q[:, -1] - Q[:, 0]
    assert w90[wide].mean() > 2 * w90[narrow].mean()
    # it beats the unconditional (marginal) quantiles on CRPS and pinball loss
    marg = np.tile(np.quantile(y[:1500], p.levels_), (1500, 1))
    base = DM.score_quantiles(y[1500:], marg, p.levels_)
    assert row["crps"] < base["crps"] and row["pinball_mean"] < base["pinball_mean"]
    with threadpool_limits(1):
        assert np.array_equal(p.predict(X[1500:1510]), Q[:10, 3])


def test_quantile_predictor_recalibrates_after_drift():
    from rtlm_lab.regressor.distribution import QuantileLengthPredictor, stream

    X, y = _hetero(2600, 1)
    p = QuantileLengthPredictor(model="linear", recal_window=200, recal_min=20).fit(X[:1000], y[:1000])
    Xs, ys = X[1000:], 2.5 * y[1000:]  # another LM: replies 2.5x as long
    frozen = stream(p, Xs, ys, recalibrate=False)
    recal = stream(p, Xs, ys, recalibrate=True)
    late = slice(400, None)
    cov = lambda Q: DM.central_coverage(ys[late], Q[late], p.levels_, 0.9)  # noqa: E731
    assert cov(frozen) < 0.6                       # the fitted intervals miss the longer replies
    assert 0.84 <= cov(recal) <= 0.96              # the shifted ones cover them again
    assert p.n_updates_ == 0                        # stream works on a copy
    # update() is what stream does, one request at a time
    q = p.predict_quantiles(Xs[:1])
    p.update(Xs[:30], ys[:30])
    assert p.n_updates_ == 30 and np.all(p.predict_quantiles(Xs[:1]) >= q)
    p.reset_recalibration()
    assert p.n_updates_ == 0 and np.array_equal(p.predict_quantiles(Xs[:1]), q)


def test_quantile_predictor_is_a_scikit_learn_estimator():
    from sklearn.base import clone

    from rtlm_lab.regressor.distribution import QuantileLengthPredictor

    X, y = _hetero(200, 2)
    p = QuantileLengthPredictor(model="linear", levels=(0.1, 0.5, 0.9))
    assert clone(p).get_params()["levels"] == (0.1, 0.5, 0.9)
    with pytest.raises(Exception, match="not fitted"):
        p.predict_quantiles(X[:2])
    p.fit(X, y)
    assert p.predict_quantiles(X[:5]).shape == (5, 3) and hasattr(p, "models_") and p.n_features_in_ == 3
    with pytest.raises(UserError):
        QuantileLengthPredictor(levels=(0.5, 0.1)).fit(X, y)
    with pytest.raises(UserError):
        QuantileLengthPredictor(model="nope").fit(X, y)


# ============================================================================================ wiring
@pytest.fixture(scope="module")
def quantile_predictors(ccc_sample):
    """Predictors with only the distributional column, fitted on lengths ~ words (a real spaCy pass)."""
    import pandas as pd

    from rtlm_lab.scheduler.predictions import Predictors

    texts = [t for t in ccc_sample if t.strip()][:200]
    words = np.array([len(t.split()) for t in texts], float)
    y = np.clip(np.round(2 * words + 3), 2, 80)
    pred = Predictors(("pred_quantiles",), seed=0).fit(texts[:120], y[:120])
    held = pd.DataFrame({"request_id": [f"h{i:03d}" for i in range(80)], "text": texts[120:], "context": "",
                         "n_input_tokens": words[120:].astype(int) + 1, "n_output_tokens": y[120:].astype(int)})
    return pred, held


def test_predictors_give_pred_quantiles_the_same_way_everywhere(quantile_predictors):
    from rtlm_lab.scheduler.predictions import QUANTILE_LEVELS, Predictors, columns_for

    pred, held = quantile_predictors
    texts = held["text"].tolist()[:4]
    batch = pred.predict_batch(texts, ("pred_quantiles",))
    assert [set(r) for r in batch] == [{"pred_quantiles"}] * 4
    for r in batch:
        q = r["pred_quantiles"]
        assert isinstance(q, tuple) and len(q) == len(QUANTILE_LEVELS) and list(q) == sorted(q) and q[0] >= 0
    one, sec = pred.predict_one(texts[1], ("pred_quantiles",))
    assert one["pred_quantiles"] == batch[1]["pred_quantiles"] and sec > 0
    many = pred.predict_many(texts)
    assert [tuple(v) for v in many["pred_quantiles"]] == [r["pred_quantiles"] for r in batch]
    # the default column set is unchanged; the distributional column joins it only when a policy reads it
    assert columns_for(make_policy("rtlm").needs) == columns_for(()) and "pred_quantiles" not in columns_for(())
    assert "pred_quantiles" in columns_for(make_policy("gittins").needs)
    with pytest.raises(UserError, match="pred_quantiles"):
        Predictors(("pred_rtlm",)).fit(held["text"].tolist()[:10], [5] * 10).predict_one("hi", ("pred_quantiles",))


@pytest.mark.parametrize("policy", ["gittins", "srpt_expected"])
def test_distributional_policies_serve_on_the_continuous_simulator_with_live_recalibration(tmp_path, policy,
                                                                                            quantile_predictors):
    import json

    from rtlm_lab.scheduler.continuous import run_continuous

    pred, held = quantile_predictors
    cap = tmp_path / "cap.json"
    cap.write_text(json.dumps({"capacity_rps": 1.0, "n_requests": 8, "step_model": {"a": 0.01, "b": 0.001}}))
    cfg = {"mode": "sim", "seed": 0, "lm": {"name": "q"}, "policy": {"name": policy},
           "platform": {"name": "cpu", "engine": {"max_seqs": 2, "max_batch_tokens": 1024}},
           "workload": {"kind": "poisson", "rho": 0.9, "n_requests": 80},
           "scheduler": {"capacity": str(cap), "overhead_samples": 0, "online_update": True}}
    rec, m, trace = run_continuous(cfg, tmp_path / policy, None, pred, held, progress=False)
    assert sorted(rec["request_id"]) == sorted(trace["request_id"]) and len(rec) == 80
    assert m["n_online_updates"] == 80 and pred.quantiles_.n_updates_ == 0  # a copy recalibrated, not ours
    assert (rec["actual_tokens"] == rec["true_tokens"]).all()


def test_static_path_requests_carry_the_predicted_quantiles():
    import pandas as pd

    from rtlm_lab.scheduler.harness import to_requests
    from rtlm_lab.scheduler.service import ServiceModel

    trace = pd.DataFrame({"request_id": ["a", "b"], "text": ["x", "y"], "context": "", "arrival_s": [0.0, 1.0],
                          "n_input_tokens": [3, 4], "true_tokens": [5, 6], "pred_rtlm": [5.0, 6.0],
                          "pred_quantiles": [[1.0, 2, 3, 4, 5, 6, 7], [2.0, 2, 2, 2, 2, 2, 2]]})
    svc = ServiceModel(ttft_a=0.1, ttft_b=0.0, step_1=0.01)
    reqs = to_requests(trace, svc, keep_predictions=True)
    assert reqs[0].pred["pred_quantiles"] == (1, 2, 3, 4, 5, 6, 7) and reqs[1].pred["pred_rtlm"] == 6.0
    assert make_policy("gittins").priority(reqs[1], 0.0) == pytest.approx(-0.5)
    assert "pred_quantiles" not in to_requests(trace, svc, keep_predictions=False)[0].pred


def test_distributional_table_and_drift_on_a_synthetic_profile():
    """What ``rtlm-train-regressor regressor=quantile`` prints, on a profile-shaped table (conversations of 4
    turns; the features given, so no spaCy pass)."""
    import pandas as pd

    from rtlm_lab.regressor.distribution import drift, evaluate, predictor_params

    X, y = _hetero(1200, 3)
    df = pd.DataFrame({"request_id": [f"c{i // 4}-{i % 4}" for i in range(1200)], "text": "t",
                       "n_output_tokens": y})
    res = evaluate(df, {"model": "linear"}, X=X)
    t = res["table"].set_index("method")
    assert list(t.index) == ["quantile_linear", "marginal", "ridge_residuals"] and res["split"]["n_test"] == 360
    assert t.loc["quantile_linear", "crps"] < t.loc["marginal", "crps"]
    assert abs(t.loc["marginal", "cover90"] - 0.9) < 0.06  # exchangeable data: the marginal band is calibrated
    assert len(res["pit"]["marginal"]) == 360 and len(res["rows"][0]["pit_hist"]) == 10
    with pytest.raises(UserError, match="rows"):
        evaluate(df, {"model": "linear"}, X=X[:-1])
    longer = df.assign(n_output_tokens=3 * y)  # another LM: 3x longer replies, same prompts
    d = drift(df, longer, {"model": "linear", "recal_min": 10}, X_source=X, X_target=X).get("table")
    d = d.set_index(["arm", "part"])
    assert d.loc[("frozen", "second_half"), "cover90"] < 0.5
    assert d.loc[("recalibrated", "second_half"), "cover90"] > 0.8
    assert d.loc[("recalibrated", "all"), "crps"] < d.loc[("frozen", "all"), "crps"]
    # conf/regressor/quantile.yaml + the distribution block -> QuantileLengthPredictor's arguments
    got = predictor_params({"name": "quantile", "kind": "quantile", "quantiles": [0.1, 0.5, 0.9], "max_iter": 50,
                            "use_prefill": False, "recal_buckets": 5},
                           {"enabled": "auto", "model": "linear", "recal_window": 100, "drift_from": None})
    assert got == {"levels": (0.1, 0.5, 0.9), "max_iter": 50, "model": "linear", "recal_window": 100}


def test_the_continuous_simulators_pool_carries_the_predicted_quantiles():
    """Precomputed predictions reach the continuous simulator's requests, quantiles included."""
    import pandas as pd

    from rtlm_lab.scheduler.continuous import _pool, to_requests

    held = pd.DataFrame({"request_id": ["a", "b"], "text": ["x", "y"], "context": ["", ""], "n_input_tokens": [3, 4],
                         "n_output_tokens": [10, 20], "pred_rtlm": [11.0, 19.0],
                         "pred_quantiles": [(2.0, 5.0, 9.0), (4.0, 18.0, 40.0)]})
    rs = to_requests(_pool(held).assign(arrival_s=[0.0, 1.0]), keep_predictions=True)
    assert rs[0].pred["pred_quantiles"] == (2.0, 5.0, 9.0) and rs[1].pred["pred_rtlm"] == 19.0
    assert "pred_quantiles" not in to_requests(_pool(held), keep_predictions=False)[0].pred


def test_oracle_dist_ranks_by_the_true_distribution_not_the_sample():
    """oracle_dist: the Gittins index of each prompt's sampled lengths (a spread profile's ``lengths``), blind to
    the sample drawn. ``a`` always needs 4 tokens; ``b`` needs 1 or 12 (half each) and drew 12: the oracle of the
    sample (SRPT) runs ``a`` first, the distribution oracle bets on ``b``'s short branch (index 1/2 per token
    against 1/4) and learns after one token that it lost; on point masses it is SRPT. The pool carries the
    lengths from a spread profile to the requests."""
    import pandas as pd

    from rtlm_lab.scheduler.continuous import _pool, to_requests

    held = pd.DataFrame({"request_id": ["a", "b"], "text": ["x", "y"], "context": ["", ""], "n_input_tokens": [1, 1],
                         "n_output_tokens": [4, 12], "lengths": [[4, 4], [1, 12]]})
    rs = to_requests(_pool(held).assign(arrival_s=[0.0, 0.0]), keep_predictions=False)
    assert rs[1].true_dist == (1, 12) and rs[0].true_dist == (4, 4)

    def run(policy, reqs):
        clock = VirtualClock()
        pol = make_policy(policy, {})
        eng = Engine("e0", SimBackend(UNIT), pol, max_seqs=1, max_batch_tokens=4096, step_model=UNIT)
        jobs, _ = serve(reqs, pol, [eng], clock, PredictorServer(reqs, (), clock))
        return {j.rid: j.finish_s for j in jobs}

    fresh = lambda: to_requests(_pool(held).assign(arrival_s=[0.0, 0.0]), keep_predictions=False)  # noqa: E731
    assert run("oracle_srpt", fresh()) == {"a": 4.0, "b": 16.0}
    assert run("oracle_dist", fresh()) == {"a": 5.0, "b": 16.0}   # b's first token, then a, then b's rest
    with pytest.raises(UserError, match="spread profile"):
        run("oracle_dist", _reqs([("z", 0.0, 3, _point(3))]))
