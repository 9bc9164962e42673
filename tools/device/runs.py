"""Device job: real continuous-engine runs (fair harness), resumable (a run with metrics.json is skipped).
usage: runs2.py OUT LM N RHOS POLICIES SEEDS [TRAIN_PROFILE_WITH_TEXTS]
Predictors (RT-LM regressor, MiniLM proxy/LTR) are fitted by load_or_fit only when a policy needs them; the
LM-state probe is fitted once (train profile with texts) when a policy uses it."""
import json, os, sys, time
from pathlib import Path
import pandas as pd
from omegaconf import OmegaConf
from rtlm_lab.lm.loader import lm_config, load_lm
from rtlm_lab.paths import ROOT
from rtlm_lab.scheduler.continuous import run_continuous
from rtlm_lab.scheduler.policies import make_policy
from rtlm_lab.scheduler.predictions import load_or_fit
from rtlm_lab.io import write_parquet_atomic

out = Path(sys.argv[1]); lm = sys.argv[2]; n = int(sys.argv[3]); rhos = [float(x) for x in sys.argv[4].split(",")]
policies = sys.argv[5].split(","); seeds = [int(x) for x in sys.argv[6].split(",")]
train_path = sys.argv[7] if len(sys.argv) > 7 else None
PLAT = os.environ.get("PLAT", "cuda")
platform = OmegaConf.to_container(OmegaConf.load(ROOT / f"conf/platform/{PLAT}.yaml"))
platform["offload_workers"] = int(os.environ.get("OFFLOAD", "0"))
if os.environ.get("MAX_SEQS"):
    platform["engine"]["max_seqs"] = int(os.environ["MAX_SEQS"])
prof = ROOT / f"outputs/reference/profiles/{lm}__{PLAT}.parquet"
profile = pd.read_parquet(prof)
pols = {p: make_policy(p) for p in policies}
need_model = any(pols[p].needs for p in policies)
probe = None
if any(getattr(pols[p], "uses_lm_state", False) for p in policies):
    from rtlm_lab.scheduler.lmprobe import fit_state_probe
    t0 = time.time()
    lmobj = load_lm(lm_config(lm), platform)
    train = pd.read_parquet(train_path)
    probe = fit_state_probe(lmobj, train, refine_ks=(8, 16), refine_every=8, batch_size=128, probe=os.environ.get("PROBE", "ridge"))
    probe.meta.update({"train_profile": os.path.basename(train_path), "n_train": len(train)})
    print(f"probe: {probe.meta['probe']} val tau {probe.meta['val_kendall_tau']} fit {time.time()-t0:.0f}s", flush=True)
    del lmobj
gpu = __import__("torch").cuda.get_device_name(0) if PLAT == "cuda" else "cpu"
for seed in seeds:
    if need_model:
        cols = tuple(os.environ["PRED_COLS"].split(",")) if os.environ.get("PRED_COLS") else None
        kw = {"columns": cols} if cols else {}
        predictors, _train, held = load_or_fit(prof, profile, 0.4, seed, cache_dir=Path("/tmp/rtlm/cache"), **kw)
    else:
        from rtlm_lab.scheduler.predictions import split_pool
        predictors, (_train, held) = None, split_pool(profile, 0.4, seed)
    for rho in rhos:
        for pol in policies:
            d = out / f"{lm}__{PLAT}__seqs{platform['engine']['max_seqs']}__rho{rho}__{pol}__s{seed}"
            if (d / "metrics.json").is_file():
                continue
            cfg = {"mode": "real", "lm": lm_config(lm), "platform": platform, "seed": seed, "policy": {"name": pol},
                   "workload": {"name": "poisson", "kind": "poisson", "rho": rho, "n_requests": n},
                   "scheduler": {"slo_k": 5.0, "warmup_frac": 0.1, "sanity_check": False}}
            t0 = time.time()
            rec, m, trace = run_continuous(cfg, d, profile, predictors if pols[pol].needs else None, held,
                                           progress=False, state_probe=probe)
            write_parquet_atomic(rec, d / "requests.parquet")
            write_parquet_atomic(trace.drop(columns=["text"]), d / "trace.parquet")
            m.update({"lm": lm, "platform": PLAT, "policy": make_policy(pol).describe(), "seed": seed, "mode": "real",
                      "rho": rho, "gpu": gpu, "commit": os.environ.get("COMMIT", ""),
                      "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            (d / "metrics.json").write_text(json.dumps(m, indent=1, default=str))
            print(f"{lm} rho={rho} {pol} s{seed}: mean {m['mean_rt_s']:.3f}s p99 {m['p99_rt_s']:.3f}s realized rho "
                  f"{m['realized_rho']:.2f} cap {m['capacity_rps']:.1f} pred {m['prediction_share']:.3f} mae "
                  f"{m['pred_mae_tokens']:.1f} running {m['mean_running_seqs']:.1f} ({time.time()-t0:.0f}s)", flush=True)
