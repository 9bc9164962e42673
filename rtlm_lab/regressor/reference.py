"""The regressor comparison over every committed reference profile.

``rtlm-reference target=regressor`` (:func:`build_reference`) runs :func:`rtlm_lab.regressor.evaluate.compare` for every
``outputs/reference/profiles/<lm>__<platform>.parquet`` present and each ``target.kinds`` regressor (ridge and
hgb by default; the MiniLM embedding is computed once per profile and shared), and writes to
``outputs/reference/regressor/``:

* ``summary.csv``: one row per (lm, platform, method): ``lm, platform, method, kendall_tau, spearman, mae,
  us_per_prompt`` + ``tau_ci_low, tau_ci_high, pairwise_acc, bucket_acc, n_test`` (baselines once per
  profile, from the first kind's run; the split is the same for every kind);
* ``kendall_tau.png/svg``: Kendall tau per method and profile with bootstrap 95% CIs;
* ``provenance.json``: arguments, commit, machine, versions, each profile's sha256.

``target.profiles=[gemma3_270m__cuda,smollm2_135m__cuda]`` restricts the run; ``target.out`` writes elsewhere.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

SUMMARY_COLUMNS = ["lm", "platform", "method", "kendall_tau", "spearman", "mae", "us_per_prompt", "tau_ci_low",
                   "tau_ci_high", "pairwise_acc", "bucket_acc", "n_test"]


def build(profiles: list[Path], kinds=("ridge", "hgb"), n_bootstrap: int = 1000, seed: int = 0,
          test_size: float = 0.3) -> pd.DataFrame:
    from rtlm_lab.regressor import features as F
    from rtlm_lab.regressor.evaluate import compare

    rows = []
    for p in profiles:
        lm, platform = p.stem.split("__", 1)
        df = pd.read_parquet(p)
        df = df[df["n_output_tokens"].notna()].reset_index(drop=True)
        E = F.embed(df["text"].fillna("").astype(str).tolist()).astype(float)
        for i, kind in enumerate(kinds):
            res = compare(df, {"kind": kind}, test_size=test_size, seed=seed, n_bootstrap=n_bootstrap, E=E)
            t = res["table"]
            if i > 0:
                t = t[t["method"].str.startswith("rtlm_")]
            t = t.assign(lm=lm, platform=platform)
            rows.append(t)
            print(f"{lm} on {platform}, {kind}: " + ", ".join(
                f"{m}={v:.3f}" for m, v in zip(t["method"], t["kendall_tau"]) if math.isfinite(v)), flush=True)
    out = pd.concat(rows, ignore_index=True)
    return out[SUMMARY_COLUMNS]


def plot_summary(summary: pd.DataFrame, out_dir=None, stem: str = "kendall_tau"):
    import matplotlib.pyplot as plt

    from rtlm_lab.viz.common import save_figure

    s = summary[summary["method"] != "oracle"].copy()
    s["profile"] = s["lm"] + "\n" + s["platform"]
    profiles = list(dict.fromkeys(s["profile"]))
    methods = list(dict.fromkeys(s["method"]))
    w = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(profiles) + 2), 4.2))
    cmap = plt.get_cmap("tab10")
    for j, m in enumerate(methods):
        d = s[s["method"] == m].set_index("profile").reindex(profiles)
        tau = d["kendall_tau"].astype(float)
        lo = (tau - d["tau_ci_low"]).clip(lower=0).fillna(0)
        hi = (d["tau_ci_high"] - tau).clip(lower=0).fillna(0)
        ax.bar(np.arange(len(profiles)) + (j - (len(methods) - 1) / 2) * w, tau.fillna(0), w, yerr=[lo, hi],
               capsize=2, label=m, color=cmap(j % 10))
    ax.set_xticks(range(len(profiles)))
    ax.set_xticklabels(profiles, fontsize=8)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("Kendall tau vs true length (95% CI)")
    ax.set_title("output-length ranking on held-out conversations")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    if out_dir is not None:
        save_figure(fig, out_dir, stem)
    plt.close(fig)
    return fig


def build_reference(profiles: list[str] = (), kinds: list[str] = ("ridge", "hgb"), n_bootstrap: int = 1000,
                    seed: int = 0, profiles_dir: str | Path | None = None, out: str | Path | None = None,
                    ) -> pd.DataFrame:
    """:func:`build` over the named (or every) reference profile, written to ``out``: ``summary.csv``, the
    Kendall tau figure and ``provenance.json`` (the arguments, commit, machine, each profile's sha256)."""
    import matplotlib

    matplotlib.use("Agg")
    from rtlm_lab.errors import UserError
    from rtlm_lab.io import atomic_path, provenance, sha256_file, write_json_atomic
    from rtlm_lab.paths import reference_dir

    args = {"profiles": ",".join(profiles), "kinds": ",".join(kinds), "n_bootstrap": n_bootstrap, "seed": seed,
            "profiles_dir": None if profiles_dir is None else str(profiles_dir),
            "out": None if out is None else str(out)}
    pdir = Path(profiles_dir) if profiles_dir else reference_dir() / "profiles"
    present = sorted(pdir.glob("*__*.parquet"))
    if profiles:
        missing = [w for w in profiles if not (pdir / f"{w}.parquet").is_file()]
        if missing:
            raise UserError(f"no reference profile {', '.join(missing)} in {pdir}")
        present = [pdir / f"{w}.parquet" for w in profiles]
    if not present:
        raise UserError(f"no reference profiles in {pdir}; run `rtlm-profile` then "
                        f"`rtlm-reference target=profiles target.runs=[<run dir>]`")
    summary = build(present, list(kinds), n_bootstrap=n_bootstrap, seed=seed)
    out = Path(out) if out else reference_dir() / "regressor"
    summary = with_lmstate_rows(summary, out / "lmstate")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False, float_format="%.6g")
    plot_summary(summary, out)
    write_json_atomic(out / "provenance.json", provenance(args, profiles={p.stem: sha256_file(p) for p in present}))
    print(summary.pivot_table(index="method", columns=["lm", "platform"], values="kendall_tau", sort=False)
          .round(3).to_string())
    print(f"wrote {out / 'summary.csv'}")
    return summary


LMSTATE_PREFIXES = ("lmstate_", "rtlm_ridge_prefill")


def lmstate_rows(lmstate_dir: str | Path) -> pd.DataFrame:
    """The LM-state comparison (``rtlm-train-regressor regressor.use_prefill=true``) of each LM, one row set per
    LM's data set: for each LM the committed ``<lm>__<platform>__<tag>.metrics.json`` with the most training
    rows; every method of its table (input length, MiniLM proxy/LTR, RT-LM's regressor, the probes, refinement
    at step k as ``refine@k:<method>`` on the requests still decoding), with ``platform`` = ``cpu+cuda``
    (greedy lengths are the same on both) and the training set named in ``data_set``."""
    import json

    best: dict[str, tuple[int, dict, Path]] = {}
    for p in sorted(Path(lmstate_dir).glob("*.metrics.json")):
        m = json.loads(p.read_text())
        n = int(m.get("split", {}).get("n_train", 0))
        if m.get("lm") and (m["lm"] not in best or n > best[m["lm"]][0]):
            best[m["lm"]] = (n, m, p)
    rows = []
    for lm, (n, m, p) in sorted(best.items()):
        sp = m.get("split", {})
        ds = f"train {n} turns ({sp.get('n_train_conversations')} conv.), test {sp.get('n_test')} ({p.name})"
        for r in m.get("methods", []):
            rows.append({**r, "lm": lm, "platform": "cpu+cuda", "data_set": ds})
        for r in m.get("refine", []) or []:
            if r.get("method") in ("refine+repfeat+gated_loop", "prefill_minus_k", "oracle"):
                rows.append({**{k: v for k, v in r.items() if k not in ("k", "method")},
                             "method": f"refine@{int(r['k'])}:{r['method']}", "lm": lm, "platform": "cpu+cuda",
                             "data_set": ds + f"; remaining length of the test requests still decoding at step {int(r['k'])}"})
    return pd.DataFrame(rows)


def with_lmstate_rows(summary: pd.DataFrame, lmstate_dir: str | Path) -> pd.DataFrame:
    """``summary`` without earlier LM-state rows, plus :func:`lmstate_rows` (columns of ``summary`` first)."""
    base = summary[summary["platform"] != "cpu+cuda"] if "platform" in summary else summary
    extra = lmstate_rows(lmstate_dir)
    if not len(extra):
        return base
    cols = list(base.columns) + [c for c in extra.columns if c not in base.columns]
    return pd.concat([base, extra], ignore_index=True)[cols]


def merge_lmstate(out: str | Path | None = None) -> pd.DataFrame:
    """Refresh the LM-state rows of the committed ``summary.csv`` in place (no re-evaluation of the rest):
    ``rtlm-reference target=regressor target.lmstate_only=true``."""
    from rtlm_lab.io import atomic_path
    from rtlm_lab.paths import reference_dir

    out = Path(out) if out else reference_dir() / "regressor"
    summary = with_lmstate_rows(pd.read_csv(out / "summary.csv"), out / "lmstate")
    with atomic_path(out / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False, float_format="%.6g")
    print(summary[summary["platform"] == "cpu+cuda"].pivot_table(index="method", columns="lm", values="kendall_tau",
                                                                 sort=False).round(3).to_string())
    return summary


#: What notebook 02 compares on the served LM's states: baselines, the prefill probe, refinement while decoding.
LMSTATE_VIEW = {"input_length": "input length", "rtlm_ridge": "RT-LM regressor", "proxy_minilm": "MiniLM proxy",
                "finetuned_minilm": "fine-tuned MiniLM", "finetuned_minilm_rank": "fine-tuned MiniLM ranker",
                "lmstate_auto": "LM state, prefill", "refine@8:refine+repfeat+gated_loop": "LM state, refined k=8",
                "refine@16:refine+repfeat+gated_loop": "LM state, refined k=16"}


def lmstate_view(summary_csv: str | Path | None = None, out_dir=None) -> dict | None:
    """Notebook 02's view of the committed LM-state comparison (``platform=cpu+cuda`` rows of ``summary.csv``):
    ``{"table": Kendall tau per LM x method, with its 95% CI, "figure": the bar chart}``; ``None`` when the
    file or its LM-state rows are missing. Methods in :data:`LMSTATE_VIEW` order, renamed for reading."""
    from rtlm_lab.paths import repo_root

    path = Path(summary_csv) if summary_csv else repo_root() / "outputs" / "reference" / "regressor" / "summary.csv"
    if not path.is_file():
        return None
    s = pd.read_csv(path)
    s = s[(s["platform"] == "cpu+cuda") & s["method"].isin(list(LMSTATE_VIEW))]
    if not len(s):
        return None
    s = s.assign(order=s["method"].map(list(LMSTATE_VIEW).index)).sort_values(["order", "lm"])
    s = s.assign(method=s["method"].map(LMSTATE_VIEW), platform="")
    fig = plot_summary(s, out_dir, stem="lmstate_vs_baselines")
    cell = s.apply(lambda r: f"{r.kendall_tau:.2f} [{r.tau_ci_low:.2f}, {r.tau_ci_high:.2f}]", axis=1)
    table = s.assign(tau=cell).pivot(index="method", columns="lm", values="tau").reindex(
        [v for v in LMSTATE_VIEW.values() if v in set(s["method"])]).fillna("not run")
    return {"table": table, "figure": fig}

