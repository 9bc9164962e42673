"""Several engines of one LM (GPU replicas, issue 18) on the CPU: the two-GPU platform config in simulation
(each replica the committed one-GPU measurement), the baselines' placements through the CLI, the one-line errors,
and the replica benchmark with the real DialoGPT-ccc (one engine vs two replicas with a thread each vs two
stepped in turn)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import schedule_cli

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "outputs" / "reference" / "scheduler" / "engine"
needs_engine = pytest.mark.skipif(not list(ENGINE.glob("dialogpt_ccc__cuda__*.json")),
                                  reason="no committed DialoGPT-ccc cuda engine measurement")
X2 = ["mode=sim", "lm=dialogpt_ccc", "platform=cuda_x2", "platform.engine.max_seqs=64", "workload.n_requests=60",
      "scheduler.overhead_samples=0", "scheduler.figures=false"]


def _one_line(res) -> str:
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip() and not ln.startswith("[")]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr[-2000:]
    return lines[0]


@needs_engine
def test_two_replicas_in_sim_from_the_one_gpu_measurement(tmp_path):
    """platform=cuda_x2 in sim mode with no two-GPU measurement: each replica is the committed one-GPU engine
    (said in the capacity's source), the capacity is the simulated set's, every request is served once across
    both engines; RT-LM places by predicted completion, FCFS with round_robin alternates exactly."""
    res = schedule_cli(["-m", *X2, "policy=rtlm,fcfs", "policy.placement=predicted,round_robin"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = {}
    for p in (tmp_path / "schedule").rglob("metrics.json"):
        m = json.loads(p.read_text())
        runs[(m["policy"]["name"], m["policy"]["placement"])] = m
    assert len(runs) == 4
    for (name, placement), m in runs.items():
        assert m["n_engines"] == 2 and m["engine_threads"] is False  # the simulator steps engines in event order
        assert m["n_requests"] == m["n_unique_completed"] == 60
        assert "x2 replicas" in m["capacity"]["source_file"] and "dialogpt_ccc__cuda__" in m["capacity"]["source_file"]
        assert m["placement_typical_tokens"] > 0
        per = m["requests_per_worker"]
        assert set(per) == {"engine0:cuda:0", "engine1:cuda:1"} and sum(per.values()) == 60, (name, placement, per)
    rr = runs[("fcfs", "round_robin")]["requests_per_worker"]
    assert rr["engine0:cuda:0"] == rr["engine1:cuda:1"] == 30


@pytest.mark.parametrize("args,needle", [
    (["policy=fcfs", "policy.placement=random"], "policy.placement must be one of jsq, round_robin, predicted"),
    (["lm=blenderbot_ccc", "policy=fcfs"], "GPU replicas are served by the continuous engine only"),
])
def test_replica_config_mistakes_are_one_line(tmp_path, args, needle):
    res = schedule_cli([*X2, *args], tmp_path, timeout=300)
    assert needle in _one_line(res)
    assert not list(tmp_path.rglob("metrics.json"))


def test_replicas_on_more_gpus_than_the_machine_has_is_one_line():
    import torch

    from rtlm_lab.errors import UserError
    from rtlm_lab.lm.loader import resolve_device

    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs a CUDA GPU"):
            resolve_device({"name": "cuda_x2", "device": "cuda:0", "devices": ["cuda:0", "cuda:1"]})
        return
    n = torch.cuda.device_count()
    with pytest.raises(UserError, match=f"needs cuda:{n}, but torch sees {n} GPU"):
        resolve_device({"name": "x", "device": "cuda:0", "devices": [f"cuda:{k}" for k in range(n + 1)]})


# ~90 s (three processes of the real DialoGPT-ccc): make test-full. The fast suite keeps replicas through
# test_two_replicas_in_sim_from_the_one_gpu_measurement and test_engine.py's two-engine tests.
@pytest.mark.slow
def test_replica_bench_on_the_cpu(tmp_path):
    """rtlm-bench bench=replicas on the 2-core CPU with the real DialoGPT-ccc: every mode in its own process,
    the same greedy tokens for every request in all three; replicas with a thread each overlap their steps,
    replicas stepped in turn never do."""
    from rtlm_lab.scheduler.bench_replicas import bench

    out = tmp_path / "replicas.json"
    platform = {"name": "cpu", "device": "cpu", "dtype": "float32", "threads": 2,
                "engine": {"max_seqs": 4, "max_batch_tokens": 2048}}
    res = bench("dialogpt_ccc", platform, n=12, max_seqs=4, out=out, config={"test": True})
    assert json.loads(out.read_text())["modes"].keys() == {"one", "threaded", "serial"}
    one, thr, ser = (res["modes"][m] for m in ("one", "threaded", "serial"))
    assert one["n_engines"] == 1 and thr["n_engines"] == ser["n_engines"] == 2
    assert thr["threaded"] and not ser["threaded"]
    for r in (one, thr, ser):
        assert r["identical_tokens"] == {"same": 12, "n": 12} and r["tokens"] == one["tokens"]
    assert all(v == 6 for v in thr["requests_per_engine"].values())  # all queued at t=0: JSQ halves them
    assert thr["overlap_share"] > 0 and ser["overlap_share"] == 0
    assert res["provenance"]["lm"] == "dialogpt_ccc"
