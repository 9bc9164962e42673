"""The committed distributional results: ``rtlm-reference target=distribution`` -> ``outputs/reference/regressor/
distribution/`` (issue 34, deliverable 4).

For every LM of ``target.lms``, on the LM's committed test profile (``profiles/<lm>__<platform>.parquet``: the
held-out conversations) with every method trained on its train profile (``profiles/train/<lm>__<platform>
.parquet``, 5,000 train turns, conversations disjoint), :func:`lm_table` scores with
:func:`rtlm_lab.distmetrics.score_quantiles`:

* ``quantile_hgb``: :class:`~rtlm_lab.regressor.distribution.QuantileLengthPredictor` over RT-LM's features
  (the six uncertainty scores, total, log words, log spaCy tokens);
* the baselines of :func:`~rtlm_lab.regressor.distribution.evaluate`: ``marginal`` (the training lengths' own
  quantiles) and ``ridge_residuals`` (RT-LM's ridge point prediction + the training residuals' quantiles);
* ``lmstate_hgb`` (where the LM's states are extracted, ``target.lmstate_lms``): the same quantile heads over
  the *served LM's* prefill state (:func:`rtlm_lab.lm.states.extract_states`: last-token and mean-pooled
  hidden states of the middle and last layer, next-token entropy, P(end of turn), prompt tokens; cached under
  ``data/cache/lmstate``), reduced by :func:`state_design` (standardize, PCA to ``n_components`` fitted on the
  training rows, the three scalars kept as they are).

Beside each row: a conversation-bootstrap 95% CI of the 90% interval's coverage (``cover90_lo/hi``).

:func:`refine_table`: the conditional distribution of the **remaining** length after ``k`` generated tokens,
on the test requests still decoding at ``k`` (truth ``n - k``): ``prefill_minus_k`` (the prefill quantiles of
``quantile_hgb`` minus ``k``, kept >= 1), ``marginal_alive`` (the remaining lengths of the training requests
alive at ``k``), ``rtlm_alive`` (the quantile heads over RT-LM's features, refitted on those) and, where states
are extracted, ``lmstate_k`` (the heads over the state after teacher-forcing the reply's first ``k`` tokens, +
the repetition features of those tokens, :func:`rtlm_lab.regressor.lmstate.token_features`).

:func:`drift_table`: :func:`rtlm_lab.regressor.distribution.drift` for each ``target.drift_pairs`` pair
(RT-LM's features: the LM-state heads of one LM cannot read another LM's states).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from rtlm_lab.distmetrics import score_quantiles
from rtlm_lab.errors import UserError

LMS = ("dialogpt_ccc", "blenderbot_ccc", "godel_ccc", "smollm2_135m", "gemma3_270m")
COLUMNS = ["lm", "method", "features", "pinball_mean", "crps", "cover50", "cover90", "cover90_lo", "cover90_hi",
           "width50", "width90", "kendall_tau_median", "n_train", "n"]


# ------------------------------------------------------------------------------------------------- data
class FeatureCache:
    """RT-LM's feature rows by text (the five LMs' profiles share their prompts: spaCy parses each once)."""

    def __init__(self):
        self._rows: dict[str, np.ndarray] = {}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        from rtlm_lab.regressor.distribution import QuantileLengthPredictor

        texts = [str(t) for t in texts]
        todo = list(dict.fromkeys(t for t in texts if t not in self._rows))
        if todo:
            for t, r in zip(todo, QuantileLengthPredictor.featurize(todo)):
                self._rows[t] = np.asarray(r, float)
        return np.vstack([self._rows[t] for t in texts]) if texts else np.zeros((0, 0))


def joined(test_df: pd.DataFrame, train_df: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The frame :func:`rtlm_lab.regressor.distribution.evaluate` builds with ``extra_train``: the test
    profile's usable rows, then the train profile's rows from conversations the test profile does not hold;
    returns ``(frame, train positions, test positions)``."""
    from rtlm_lab.regressor.evaluate import conversation_ids, usable_rows

    te_df = usable_rows(test_df)
    ex = usable_rows(train_df)
    ex = ex[~np.isin(conversation_ids(ex), conversation_ids(te_df))].reset_index(drop=True)
    df = pd.concat([te_df, ex], ignore_index=True)
    return df, np.arange(len(te_df), len(df)), np.arange(len(te_df))


def load_profiles(lm: str, platform: str = "cuda", profiles_dir: str | Path | None = None
                  ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Path]]:
    """``(test profile, train profile with texts, paths)`` of one LM."""
    from rtlm_lab.paths import reference_dir
    from rtlm_lab.regressor.lmstate import with_texts

    pdir = Path(profiles_dir) if profiles_dir else reference_dir() / "profiles"
    paths = {"test": pdir / f"{lm}__{platform}.parquet", "train": pdir / "train" / f"{lm}__{platform}.parquet"}
    for k, p in paths.items():
        if not p.is_file():
            raise UserError(f"no {k} profile {p} (the distributional table trains on the LM's train profile)")
    return pd.read_parquet(paths["test"]), with_texts(pd.read_parquet(paths["train"])), paths


# --------------------------------------------------------------------------------------------- features
def state_design(states, tr: np.ndarray, n_components: int = 32, seed: int = 0) -> np.ndarray:
    """The LM-state design matrix: standardized hidden-state features (last-token and mean-pooled, every
    extracted layer) projected on their first ``n_components`` principal components (scaler and PCA fitted on
    the rows ``tr`` only), then the three scalars (entropy, log P(end of turn), log1p prompt tokens)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from rtlm_lab.regressor.lmstate import feature_matrix, scalar_features

    H = feature_matrix(states, ("last", "mean"))
    sc = StandardScaler().fit(H[tr])
    nc = int(min(n_components, len(tr) - 1, H.shape[1]))
    pca = PCA(n_components=nc, random_state=seed).fit(sc.transform(H[tr]))
    return np.hstack([pca.transform(sc.transform(H)), scalar_features(states)])


def _lm_loader(lm: str, platform: str):
    from rtlm_lab.uncertainty.modelside import _default_loader

    holder: dict = {}

    def get():
        if "lm" not in holder:
            holder["lm"] = _default_loader(lm, platform)()
        return holder["lm"]

    return get


def _sha(paths: Sequence[Path]) -> str:
    import hashlib

    from rtlm_lab.io import sha256_file

    return hashlib.sha256("".join(sha256_file(p) for p in paths).encode()).hexdigest()


def states_of(get_lm, df: pd.DataFrame, key: str, sha: str, layers, batch_size: int, k: int = 0,
              prefix: list[list[int]] | None = None, cache: bool = True):
    """The LM's states for the rows of ``df`` (after teacher-forcing ``prefix``, each row's first ``k`` reply
    tokens, when given), cached under ``data/cache/lmstate`` unless ``cache`` is false."""
    from rtlm_lab.lm.states import cached_states, extract_states

    if cache:
        return cached_states(get_lm, df, sha, key, layers, int(k), prefix, batch_size)
    ctx = df["context"].fillna("").astype(str).tolist() if "context" in df else None
    return extract_states(get_lm(), df["text"].fillna("").astype(str).tolist(), ctx, layers=layers,
                          batch_size=batch_size, prefix_ids=prefix)


def reply_prefixes(get_lm, df: pd.DataFrame, k: int, key: str, sha: str, batch_size: int, cache: bool = True,
                   verify_n: int = 0) -> tuple[list[list[int]], dict[str, Any]]:
    """Each row's first ``k`` reply tokens: the train profile's ``output_ids`` where present; else its ``reply``
    text re-tokenized (the test profiles keep the reply text, not its ids); else a greedy ``generate`` of ``k``
    tokens. Returns ``(prefixes, check)``: ``check`` compares the re-tokenized replies with a greedy
    ``generate`` on the first ``verify_n`` of those rows that decoded more than ``k`` tokens (on DialoGPT-ccc
    all 379 such test rows agreed)."""
    from rtlm_lab.lm.states import reply_prefix_ids

    has = df["output_ids"].notna().to_numpy() if "output_ids" in df else np.zeros(len(df), bool)
    out: list[list[int]] = [[] for _ in range(len(df))]
    for i in np.flatnonzero(has):
        out[i] = [int(t) for t in list(df["output_ids"].iloc[i])[:k]]
    check: dict[str, Any] = {"k": int(k), "n_output_ids": int(has.sum()), "n_retokenized": 0, "n_generated": 0}
    has_reply = df["reply"].notna().to_numpy() & ~has if "reply" in df else np.zeros(len(df), bool)
    if has_reply.any():
        tok = get_lm().tokenizer
        for i in np.flatnonzero(has_reply):
            out[i] = [int(t) for t in tok(str(df["reply"].iloc[i]), add_special_tokens=False)["input_ids"][:k]]
        check["n_retokenized"] = int(has_reply.sum())
        rows = [i for i in np.flatnonzero(has_reply) if df["n_output_tokens"].iloc[i] > k][:int(verify_n)]
        if rows:
            sub = df.iloc[rows].drop(columns=["output_ids"], errors="ignore").reset_index(drop=True)
            gen = reply_prefix_ids(get_lm, sub, k, batch_size)
            check["verified"] = len(rows)
            check["verified_equal"] = int(sum(list(g)[:k] == out[i] for i, g in zip(rows, gen)))
    miss = np.flatnonzero(~has & ~has_reply)
    if len(miss):
        sub = df.iloc[miss].drop(columns=["output_ids"], errors="ignore").reset_index(drop=True)
        gen = reply_prefix_ids(get_lm, sub, k, batch_size, sha if cache else None, key)
        for i, g in zip(miss, gen):
            out[i] = list(g)
        check["n_generated"] = int(len(miss))
    return out, check


# ------------------------------------------------------------------------------------------------ scoring
def coverage_ci(y, Q, levels, groups, n_bootstrap: int = 1000, seed: int = 0, width: float = 0.9
                ) -> tuple[float, float]:
    """Conversation-bootstrap 95% CI of the central ``width`` interval's coverage."""
    lv = np.asarray(levels, float)
    i = np.flatnonzero(np.isclose(lv, (1 - width) / 2))
    j = np.flatnonzero(np.isclose(lv, (1 + width) / 2))
    if not len(i) or not len(j) or n_bootstrap <= 0:
        return math.nan, math.nan
    y, Q = np.asarray(y, float), np.sort(np.asarray(Q, float), axis=1)
    inside = ((y >= Q[:, i[0]]) & (y <= Q[:, j[0]])).astype(float)
    ug, g = np.unique(np.asarray(groups), return_inverse=True)
    s = np.bincount(g, weights=inside, minlength=len(ug))
    c = np.bincount(g, minlength=len(ug)).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(ug), size=(n_bootstrap, len(ug)))
    cov = s[draws].sum(1) / c[draws].sum(1)
    return float(np.quantile(cov, 0.025)), float(np.quantile(cov, 0.975))


def _row(lm, method, features, y, Q, levels, groups, n_train, n_bootstrap, seed) -> dict:
    r = score_quantiles(y, Q, levels, seed=seed)
    lo, hi = coverage_ci(y, Q, levels, groups, n_bootstrap, seed)
    return {"lm": lm, "method": method, "features": features, **{k: v for k, v in r.items()},
            "cover90_lo": lo, "cover90_hi": hi, "n_train": int(n_train)}


# ------------------------------------------------------------------------------------------------- tables
def lm_table(lm: str, params: Mapping[str, Any], feats: FeatureCache, platform: str = "cuda",
             profiles_dir=None, lmstate: Mapping[str, Any] | None = None, refine_k: Sequence[int] = (8, 16),
             n_bootstrap: int = 1000, seed: int = 0, min_test: int = 10) -> dict[str, Any]:
    """One LM's distributional table, its refinement table (each ``k`` with at least ``min_test`` test and
    twice as many training requests still decoding) and what the calibration figure needs. ``lmstate``:
    ``platform``, ``layers``, ``batch_size``, ``n_components``, ``cache`` (default true) and ``loader`` (a
    zero-argument callable giving the ChatLM; default: ``conf/lm/<lm>.yaml`` on ``platform``)."""
    from rtlm_lab.distmetrics import pit
    from rtlm_lab.regressor import distribution as D
    from rtlm_lab.regressor.evaluate import conversation_ids
    from rtlm_lab.regressor.lmstate import remaining_targets, token_features

    test_df, train_df, paths = load_profiles(lm, platform, profiles_dir)
    df, tr, te = joined(test_df, train_df)
    X = feats(df["text"].fillna("").astype(str).tolist())
    res = D.evaluate(test_df, params, seed=seed, extra_train=train_df, X=X)
    lv = np.asarray(res["levels"])
    y = df["n_output_tokens"].to_numpy(float)
    groups = conversation_ids(df)
    quant = dict(res["quantiles"])
    feat_of = {m: ("RT-LM" if m != "marginal" else "none") for m in quant}
    pp = {"random_state": seed, **dict(params)}
    st = None
    if lmstate:
        key = f"{lm}__{lmstate.get('platform', 'cpu')}"
        sha = _sha(list(paths.values()))
        get_lm = lmstate.get("loader") or _lm_loader(lm, str(lmstate.get("platform", "cpu")))
        layers, bs = list(lmstate.get("layers", ("mid", -1))), int(lmstate.get("batch_size", 32))
        cache = bool(lmstate.get("cache", True))
        st = states_of(get_lm, df, key, sha, layers, bs, cache=cache)
        Xs = state_design(st, tr, int(lmstate.get("n_components", 32)), seed)
        quant["lmstate_hgb"] = D.QuantileLengthPredictor(**pp).fit(Xs[tr], y[tr]).predict_quantiles(Xs[te])
        feat_of["lmstate_hgb"] = f"LM state (PCA {int(lmstate.get('n_components', 32))} + 3 scalars)"
    rows = [_row(lm, m, feat_of[m], y[te], Q, lv, groups[te], len(tr), n_bootstrap, seed) for m, Q in quant.items()]
    pits = {m: pit(y[te], Q, lv, seed=seed) for m, Q in quant.items()}

    # refinement: remaining length after k tokens, on the test requests still decoding at k
    ref_rows, checks = [], []
    base = quant[next(m for m in quant if m.startswith("quantile_"))]
    for k in refine_k:
        alive, rem = remaining_targets(y, int(k))
        tr_a, te_a = tr[alive[tr]], te[alive[te]]
        if len(te_a) < min_test or len(tr_a) < 2 * min_test:
            continue
        yt = rem[te_a]
        cap = float(np.max(y[tr])) - k
        arms = {"prefill_minus_k": np.clip(base[alive[te]] - k, 1, cap),
                "marginal_alive": np.tile(np.quantile(rem[tr_a], lv), (len(te_a), 1)),
                "rtlm_alive": D.QuantileLengthPredictor(**pp).fit(X[tr_a], rem[tr_a]).predict_quantiles(X[te_a])}
        feats_k = {"prefill_minus_k": "RT-LM (prefill)", "marginal_alive": "none", "rtlm_alive": "RT-LM"}
        if lmstate:
            rows_k = np.concatenate([tr_a, te_a])
            prefix, chk = reply_prefixes(get_lm, df, int(k), key, sha, bs, cache,
                                         int(lmstate.get("verify_prefix_n", 0)))
            checks.append({"lm": lm, **chk})
            stk = states_of(get_lm, df.iloc[rows_k].reset_index(drop=True), key, sha, layers, bs, int(k),
                            [prefix[i] for i in rows_k], cache)
            ntr = len(tr_a)
            Xk = np.hstack([state_design(stk, np.arange(ntr), int(lmstate.get("n_components", 32)), seed),
                            token_features([prefix[i] for i in rows_k])])
            arms["lmstate_k"] = D.QuantileLengthPredictor(**pp).fit(Xk[:ntr], rem[tr_a]).predict_quantiles(Xk[ntr:])
            feats_k["lmstate_k"] = "LM state after k tokens + repetition features"
        for m, Q in arms.items():
            r = _row(lm, m, feats_k[m], yt, Q, lv, groups[te_a], len(tr_a), n_bootstrap, seed)
            ref_rows.append({"k": int(k), **r})
    return {"rows": rows, "refine": ref_rows, "pit": pits, "quantiles": quant, "y_test": y[te],
            "levels": [float(v) for v in lv], "split": res["split"], "paths": paths, "prefix_checks": checks}


def drift_table(pairs: Sequence[Sequence[str]], params: Mapping[str, Any], feats: FeatureCache,
                platform: str = "cuda", profiles_dir=None, seed: int = 0) -> pd.DataFrame:
    """:func:`rtlm_lab.regressor.distribution.drift` per (source, target) pair: fitted on the source LM's
    train profile, serving every request of the target LM's test profile in a seeded order."""
    from rtlm_lab.regressor import distribution as D
    from rtlm_lab.regressor.evaluate import conversation_ids, usable_rows

    out = []
    for src, tgt in pairs:
        _, src_train, _ = load_profiles(src, platform, profiles_dir)
        tgt_test, _, _ = load_profiles(tgt, platform, profiles_dir)
        t = usable_rows(tgt_test)
        fit_df = usable_rows(src_train)
        fit_df = fit_df[~np.isin(conversation_ids(fit_df), conversation_ids(t))].reset_index(drop=True)
        r = D.drift(None, tgt_test, params, seed=seed, source_train=src_train,
                    X_source=feats(fit_df["text"].fillna("").astype(str).tolist()),
                    X_target=feats(t["text"].fillna("").astype(str).tolist()))
        out.append(r["table"].assign(source_lm=src, target_lm=tgt, n_train=r["n_train"], n_stream=r["n_stream"]))
        print(f"drift {src} -> {tgt}: " + ", ".join(
            f"{a} cover90 {v:.3f}" for a, v in r["table"].query("part == 'second_half'")[["arm", "cover90"]]
            .itertuples(index=False)), flush=True)
    df = pd.concat(out, ignore_index=True)
    first = ["source_lm", "target_lm", "arm", "part"]
    return df[first + [c for c in df.columns if c not in first]]


# ---------------------------------------------------------------------------------------------- writing
def _fmt(v, nd=2):
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


def _score_rows(g: pd.DataFrame, lead, extra) -> list[str]:
    """Markdown rows of one block of methods: ``lead(i, row)`` cells, method, features, pinball, CRPS (the
    block's best in bold), 50% and 90% coverage with its CI, ``extra(row)`` cells, tau of the median, n."""
    best = g["crps"].min()
    out = []
    for i, r in enumerate(g.itertuples(index=False)):
        crps = f"**{r.crps:.2f}**" if r.crps == best else f"{r.crps:.2f}"
        cells = [*lead(i, r), r.method, r.features, f"{r.pinball_mean:.2f}", crps, _fmt(r.cover50),
                 f"{_fmt(r.cover90)} [{_fmt(r.cover90_lo)}, {_fmt(r.cover90_hi)}]", *extra(r),
                 _fmt(r.kendall_tau_median), r.n]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return out


def to_markdown(table: pd.DataFrame, refine: pd.DataFrame, drift: pd.DataFrame) -> str:
    lines = ["### Held-out conversations (test profile; every method trained on the LM's train profile)", "",
             "| LM | method | features | mean pinball | CRPS (tok) | 50% covers | 90% covers [95% CI] | 90% width (tok) "
             "| tau of median | n test |", "|---|---|---|---|---|---|---|---|---|---|"]
    for lm, g in table.groupby("lm", sort=False):
        lines += _score_rows(g, lambda i, r: [lm if i == 0 else ""], lambda r: [f"{r.width90:.0f}"])
    if len(refine):
        lines += ["", "### Refinement: remaining length after k generated tokens (test requests still decoding at k)",
                  "", "| LM | k | method | features | mean pinball | CRPS (tok) | 50% covers | 90% covers [95% CI] "
                  "| tau of median | n |", "|---|---|---|---|---|---|---|---|---|---|"]
        for (lm, k), g in refine.groupby(["lm", "k"], sort=False):
            lines += _score_rows(g, lambda i, r: [lm if i == 0 else "", k if i == 0 else ""], lambda r: [])
    if len(drift):
        lines += ["", "### Drift: fitted on one LM's train profile, serving another LM's test requests in order "
                  "(second half of the stream)", "",
                  "| fitted on -> serving | arm | 90% covers | 50% covers | CRPS (tok) | tau of median "
                  "| mean median / true tok |", "|---|---|---|---|---|---|---|"]
        d = drift[drift["part"] == "second_half"]
        for (s, t), g in d.groupby(["source_lm", "target_lm"], sort=False):
            for i, r in enumerate(g.itertuples(index=False)):
                lines.append(f"| {f'{s} -> {t}' if i == 0 else ''} | {r.arm} | {_fmt(r.cover90)} | "
                             f"{_fmt(r.cover50)} | {r.crps:.2f} | {_fmt(r.kendall_tau_median)} | "
                             f"{r.mean_median_tokens:.0f} / {r.mean_true_tokens:.0f} |")
    return "\n".join(lines) + "\n"


def regressor_config(reg: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """A ``conf/regressor/<name>.yaml`` by name (the quantile levels and HGB settings of
    ``rtlm-train-regressor regressor=quantile``), or the mapping itself."""
    if reg is None or isinstance(reg, Mapping):
        return dict(reg or {})
    from omegaconf import OmegaConf

    from rtlm_lab.paths import ROOT

    path = ROOT / "conf" / "regressor" / f"{reg}.yaml"
    if not path.is_file():
        raise UserError(f"no regressor config {path}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def build(cfg: Mapping[str, Any], command: str = "") -> dict[str, pd.DataFrame]:
    """Every table of the folder, written to ``cfg['out']`` (default ``outputs/reference/regressor/
    distribution``): ``distribution.csv``, ``refine.csv``, ``drift.csv``, ``distribution.md``,
    ``calibration_<lm>.png/svg`` and ``provenance.json``."""
    import matplotlib

    matplotlib.use("Agg")
    from rtlm_lab.io import atomic_path, provenance, sha256_file, write_json_atomic
    from rtlm_lab.paths import reference_dir
    from rtlm_lab.regressor import distribution as D

    cfg = dict(cfg)
    out = Path(cfg.get("out") or reference_dir() / "regressor" / "distribution")
    platform = str(cfg.get("platform", "cuda"))
    seed, nb = int(cfg.get("seed", 0)), int(cfg.get("n_bootstrap", 1000))
    params = D.predictor_params(regressor_config(cfg.get("regressor", "quantile")), cfg.get("distribution") or {})
    lmstate_lms = set(cfg.get("lmstate_lms") or [])
    feats = FeatureCache()
    rows, ref, sha, checks = [], [], {}, []
    out.mkdir(parents=True, exist_ok=True)
    for lm in cfg.get("lms") or LMS:
        ls = dict(cfg.get("lmstate") or {}) if lm in lmstate_lms else None
        r = lm_table(lm, params, feats, platform, cfg.get("profiles_dir"), ls, list(cfg.get("refine_k") or []),
                     nb, seed, int(cfg.get("min_test", 10)))
        rows += r["rows"]
        ref += r["refine"]
        checks += r["prefix_checks"]
        sha.update({f"{lm}:{k}": sha256_file(p) for k, p in r["paths"].items()})
        D.plot_calibration(r, out, title=f"{lm}: {r['split']['n_test']} held-out requests "
                                         f"({r['split']['n_train']} training)", stem=f"calibration_{lm}")
        t = pd.DataFrame(r["rows"])
        print(f"{lm}: " + ", ".join(f"{m} cover90 {c:.3f} tau {k:.3f}" for m, c, k in
                                    zip(t["method"], t["cover90"], t["kendall_tau_median"])), flush=True)
    table = pd.DataFrame(rows)
    lv_cols = [c for c in table.columns if c.startswith("pinball_") and c != "pinball_mean"]
    table = table[COLUMNS + lv_cols]
    refine = pd.DataFrame(ref)
    if len(refine):
        refine = refine[["k"] + COLUMNS + lv_cols]
    drift = drift_table(cfg.get("drift_pairs") or [], params, feats, platform, cfg.get("profiles_dir"), seed) \
        if cfg.get("drift_pairs") else pd.DataFrame()
    for name, t in (("distribution", table), ("refine", refine), ("drift", drift)):
        if len(t):
            with atomic_path(out / f"{name}.csv") as tmp:
                t.to_csv(tmp, index=False, float_format="%.6g")
    md = to_markdown(table, refine, drift)
    with atomic_path(out / "distribution.md") as tmp:
        Path(tmp).write_text(md)
    pp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
    write_json_atomic(out / "provenance.json", provenance(cfg, command=command, profiles_sha256=sha,
                                                          prefix_checks=checks, predictor_params=pp))
    print(md, flush=True)
    return {"table": table, "refine": refine, "drift": drift}
