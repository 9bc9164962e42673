"""The scheduler results table (rtlm_lab.scheduler.analysis): ratios pair runs of the same seed *within one
group* (one session's runs), with CIs from the paired block bootstrap."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from rtlm_lab.scheduler.analysis import format_headline, ratio_ci, summarize


def _run(root, group, policy, seed, rt):
    d = root / group / f"{policy}__s{seed}"
    d.mkdir(parents=True)
    n = len(rt)
    pd.DataFrame({"request_id": [f"r{i}" for i in range(n)], "arrival_s": np.arange(n, dtype=float),
                  "response_s": rt, "warmup": False}).to_parquet(d / "requests.parquet")
    m = {"lm": "lmx", "platform": "cpu", "mode": "real", "policy": {"name": policy}, "seed": seed,
         "nominal_rho": 0.9, "engine_config": {"backend": "slots", "max_seqs": 8},
         "mean_rt_s": float(np.mean(rt)), "p99_rt_s": float(np.percentile(rt, 99)), "n_requests": n}
    (d / "metrics.json").write_text(json.dumps(m))
    return d


def test_ratios_pair_within_a_group_and_never_mix_sessions(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 1.5, 200)
    dirs = [_run(tmp_path, "g1", "fcfs", 0, base), _run(tmp_path, "g1", "lmstate", 0, 2 * base),
            # another session of the same LM x platform x rho, seed 0 again, where lmstate is 4x ITS fcfs
            _run(tmp_path, "g2", "fcfs", 0, 10 * base), _run(tmp_path, "g2", "lmstate", 0, 40 * base)]
    df = summarize(dirs, n_boot=200).set_index(["group", "policy"])
    assert df.loc[("g1", "lmstate"), "mean_rt_vs_fcfs"] == pytest.approx(2.0)
    assert df.loc[("g2", "lmstate"), "mean_rt_vs_fcfs"] == pytest.approx(4.0)
    assert df.loc[("g1", "lmstate"), "mean_rt_vs_fcfs_lo"] == pytest.approx(2.0)  # an exact multiple: a zero-width CI
    head = format_headline(df.reset_index())
    assert "g1" in head and "g2" in head and "2.00 [2.00, 2.00]" in head and "4.00 [4.00, 4.00]" in head


def test_ratio_ci_covers_a_noisy_ratio_and_needs_paired_runs():
    rng = np.random.default_rng(1)
    b = [rng.exponential(1.0, 300) for _ in range(3)]
    a = [x * rng.uniform(1.2, 1.4, len(x)) for x in b]
    r, lo, hi = ratio_ci(a, b, "mean", n_boot=400)
    assert lo < r < hi and 1.2 < r < 1.4 and lo > 1.0
    with pytest.raises(ValueError):
        ratio_ci(a[:2], b, "mean")


def test_headline_says_when_a_policy_has_fewer_seeds_than_its_group(tmp_path):
    rng = np.random.default_rng(2)
    base = [rng.uniform(0.5, 1.5, 100) for _ in range(3)]
    dirs = [_run(tmp_path, "g", "fcfs", s, base[s]) for s in range(3)]
    dirs += [_run(tmp_path, "g", "lmstate", s, 2 * base[s]) for s in range(3)]
    dirs += [_run(tmp_path, "g", "ltr", s, 3 * base[s]) for s in range(2)]  # one seed short
    head = format_headline(summarize(dirs, n_boot=100))
    assert "3.00 [3.00, 3.00] (2 seeds)" in head
    assert head.count("seeds)") == 1


def test_static_path_runs_get_their_own_engine_key_realized_rho_and_ttft(tmp_path):
    """The paper's static-batch path (its runs have no warm-up flag, realized rho or TTFT in metrics.json):
    the table keys them apart from the continuous engine and derives rho from arrivals x isolated time."""
    rows = []
    # both oracles ran: the static path's is oracle_sjf; rtlm_batch1 (policy max_batch 1) is an ablation on the
    # same engine (the platform's batch budget names it), compared with the same FCFS
    for pol in ("fcfs", "rtlm", "oracle_sjf", "oracle_srpt", "rtlm_batch1"):
        d = tmp_path / "static" / pol
        d.mkdir(parents=True)
        arr = np.arange(101, dtype=float) * 0.5           # 2 arrivals/s
        pd.DataFrame({"request_id": [f"r{i}" for i in range(101)], "arrival_s": arr,
                      "first_token_s": arr + 0.1, "finish_s": arr + 0.4, "response_s": 0.4 + (pol == "rtlm") * 0.4 - (pol == "oracle_sjf") * 0.2,
                      "isolated_s": 0.3}).to_parquet(d / "requests.parquet")  # 2/s x 0.3 s = rho 0.6
        (d / "metrics.json").write_text(json.dumps({
            "lm": "lmx", "platform": "cpu", "mode": "real", "engine": "static", "rho": 0.6, "seed": 0,
            "policy": {"name": pol, "max_batch": 1 if pol == "rtlm_batch1" else 4}, "n_offload_workers": 2,
            "provenance": {"config": {"platform": {"max_batch": 4}}},
            "mean_rt_s": 0.4, "p99_rt_s": 0.4, "n_requests": 101, "makespan_s": 50.0,
            "worker_utilization": {"gpu": 0.5, "cpu0": 0.25}, "prediction_s": 5.0 * (pol == "rtlm")}))
        rows.append(d)
    df = summarize(rows, n_boot=50).set_index("policy")
    assert set(df["engine_key"]) == {"static-batch4+2cpu"}
    assert df.loc["rtlm", "mean_rt_vs_fcfs"] == pytest.approx(2.0)
    assert df.loc["rtlm_batch1", "mean_rt_vs_fcfs"] == pytest.approx(1.0)
    assert df.loc["fcfs", "realized_rho"] == pytest.approx(0.6)
    assert df.loc["fcfs", "mean_ttft_ms"] == pytest.approx(100.0)
    assert df.loc["fcfs", "n_measured"] == 101
    # the static path's oracle is oracle_sjf (a batch is not preempted); prediction share of the busy time
    assert set(df["oracle"]) == {"oracle_sjf"}
    assert df.loc["rtlm", "mean_rt_vs_oracle"] == pytest.approx(4.0)
    assert df.loc["rtlm", "prediction_share"] == pytest.approx(5.0 / (0.75 * 50.0))
    assert df.loc["fcfs", "prediction_share"] == 0.0


def test_every_real_cuda_row_names_its_gpu_and_sim_or_cpu_rows_none():
    """The continuous engine writes the GPU into metrics.json, the static path only into its provenance's machine
    facts: both must reach the table's platform column ("say which GPU every row comes from")."""
    from rtlm_lab.io import run_gpu
    machine = {"provenance": {"machine": {"gpu": "NVIDIA H200"}}}
    assert run_gpu({"mode": "real", "platform": "cuda", "gpu": "NVIDIA H100 80GB HBM3"}) == "NVIDIA H100 80GB HBM3"
    assert run_gpu({"mode": "real", "platform": "cuda", "engine": "static", **machine}) == "NVIDIA H200"
    assert run_gpu({"mode": "sim", "platform": "cuda", **machine}) == ""
    assert run_gpu({"mode": "real", "platform": "cpu", **machine}) == ""
    assert run_gpu({"mode": "real", "platform": "cuda"}) == ""


def test_adding_runs_to_a_group_keeps_what_earlier_additions_said(tmp_path):
    """A group filled over two sessions (seeds 0-1, then seed 2): the second add_runs keeps the first's note and
    run list under "earlier", and n_runs counts the whole group."""
    from rtlm_lab.errors import UserError
    from rtlm_lab.scheduler.analysis import add_runs

    rng = np.random.default_rng(3)
    first = [_run(tmp_path / "src", "a", p, s, rng.uniform(0.5, 1.5, 20)) for p in ("fcfs", "rtlm") for s in (0, 1)]
    second = [_run(tmp_path / "src", "b", p, 2, rng.uniform(0.5, 1.5, 20)) for p in ("fcfs", "rtlm")]
    add_runs(first, "g", root=tmp_path / "ref", note="seeds 0-1, session one")
    add_runs(second, "g", root=tmp_path / "ref", note="seed 2, session two")
    prov = json.loads((tmp_path / "ref/runs/g/provenance.json").read_text())
    assert prov["note"] == "seed 2, session two" and prov["n_runs"] == 6 and prov["n_added"] == 2
    assert [e["note"] for e in prov["earlier"]] == ["seeds 0-1, session one"]
    assert len(prov["earlier"][0]["added"]["config"]["runs"]) == 4
    (tmp_path / "ref/runs/g/provenance.json").write_text("{broken")
    with pytest.raises(UserError, match="not JSON"):
        add_runs(second, "g", root=tmp_path / "ref")


def test_prediction_cost_per_request_and_batch_size_reach_the_table(tmp_path):
    """prediction_ms_per_request = the predictor's busy time over the requests; mean_prediction_batch = requests
    per predictor call, from n_prediction_calls where the run recorded it, else from the distinct ready times
    (a call makes its whole batch ready at once); none for a run that predicted nothing."""
    rng = np.random.default_rng(4)
    base = rng.uniform(0.5, 1.5, 120)
    dirs = [_run(tmp_path, "g", "fcfs", 0, base), _run(tmp_path, "g", "ltr", 0, 2 * base),
            _run(tmp_path, "g", "sjf_proxy", 0, 3 * base)]
    for d, calls in ((dirs[1], None), (dirs[2], 40)):
        r = pd.read_parquet(d / "requests.parquet")
        r["ready_s"] = r["arrival_s"] // 4 * 4 + 3.5  # batches of 4 arrivals, each ready when its call returns
        r.to_parquet(d / "requests.parquet")
        m = json.loads((d / "metrics.json").read_text())
        m.update({"prediction_s": 0.6, "mean_prediction_wait_ms": 1500.0})
        if calls:
            m["n_prediction_calls"] = calls
        (d / "metrics.json").write_text(json.dumps(m))
    m = json.loads((dirs[0] / "metrics.json").read_text())
    (dirs[0] / "metrics.json").write_text(json.dumps({**m, "prediction_s": 0.0, "mean_prediction_wait_ms": 0.0}))
    df = summarize(dirs, n_boot=50).set_index("policy")
    assert df.loc["ltr", "prediction_ms_per_request"] == pytest.approx(5.0)
    assert df.loc["ltr", "mean_prediction_batch"] == pytest.approx(4.0)   # 120 requests, 30 ready times
    assert df.loc["sjf_proxy", "mean_prediction_batch"] == pytest.approx(3.0)  # the recorded 40 calls win
    assert df.loc["fcfs", "prediction_ms_per_request"] == 0.0
    assert np.isnan(df.loc["fcfs", "mean_prediction_batch"])


def test_build_writes_the_results_files_and_the_report_side_writes_the_pages(tmp_path):
    """analysis.build writes summary.csv/md under its root and no page; report.write_scheduler_docs fills the
    pages' markers: the full table and the FCFS drift in docs/results.md, the headline in README.md. A group's
    closing FCFS runs (runs/<group>/fcfs_last/) stay out of the table and make the drift table."""
    from rtlm_lab.report import fill_markers, write_scheduler_docs
    from rtlm_lab.scheduler.analysis import build, fcfs_drift

    rng = np.random.default_rng(5)
    root = tmp_path / "scheduler"
    base = [rng.uniform(0.5, 1.5, 60) for _ in range(2)]
    for s in range(2):
        _run(root / "runs", "g", "fcfs", s, base[s])
        _run(root / "runs", "g", "rtlm", s, 2 * base[s])
    _run(root / "runs" / "g", "fcfs_last", "fcfs", 1, 1.5 * base[1])  # seed 1's closing FCFS, 1.5x its first
    pages = [tmp_path / "repo" / "README.md", tmp_path / "repo" / "docs" / "results.md"]
    pages[1].parent.mkdir(parents=True)
    pages[0].write_text("# R\n<!-- scheduler-summary:begin -->\nold\n<!-- scheduler-summary:end -->\nafter\n")
    pages[1].write_text("<!-- scheduler-summary:begin -->\n<!-- scheduler-summary:end -->\n"
                        "<!-- fcfs-drift:begin -->\n<!-- fcfs-drift:end -->\n")
    before = [p.read_text() for p in pages]
    df = build(root, n_boot=50)
    assert (root / "summary.csv").is_file() and (root / "summary.md").is_file()
    assert (root / "headroom.png").stat().st_size > 1000 and (root / "headroom.svg").is_file()
    assert [p.read_text() for p in pages] == before  # the analysis writes no page
    assert sorted(set(df["policy"])) == ["fcfs", "rtlm"] and set(df["n_seeds"]) == {2}  # fcfs_last not in it
    assert df.set_index("policy").loc["rtlm", "mean_rt_vs_fcfs"] == pytest.approx(2.0)
    drift = fcfs_drift(root)
    assert len(drift) == 1 and drift.iloc[0]["seed"] == 1
    assert drift.iloc[0]["last_vs_first_mean_rt"] == pytest.approx(1.5)
    written = write_scheduler_docs(df, root=root, repo=tmp_path / "repo")
    assert sorted(written) == sorted(pages)
    readme, results = (p.read_text() for p in pages)
    assert "old" not in readme and "2.00 [2.00, 2.00]" in readme and readme.endswith("after\n")
    assert "| g " in results and "closing / first" in results and "1.5" in results
    assert not fill_markers(pages[0], "fcfs-drift", "x")  # no such markers: nothing written
    assert not fill_markers(tmp_path / "missing.md", "scheduler-summary", "x")


def test_the_pages_rebuild_from_what_is_committed(tmp_path):
    """write_scheduler_docs without a table reads what is committed under outputs/reference/scheduler/ (its
    summary.csv, or no table where runs/ holds no group): the committed README and docs/results.md (the table,
    the headline and the FCFS drift) come out as they are."""
    import shutil

    from conftest import ROOT
    from rtlm_lab.report import NO_GROUPS_README, NO_GROUPS_RESULTS, write_scheduler_docs
    from rtlm_lab.scheduler.analysis import has_groups

    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    for page in ("README.md", "docs/results.md"):
        shutil.copy(ROOT / page, repo / page)
    before = [(repo / p).read_text() for p in ("README.md", "docs/results.md")]
    assert sorted(write_scheduler_docs(repo=repo)) == sorted([repo / "README.md", repo / "docs" / "results.md"])
    after = [(repo / p).read_text() for p in ("README.md", "docs/results.md")]
    assert after == before
    committed = ROOT / "outputs/reference/scheduler"
    if has_groups(committed):
        assert (committed / "summary.md").read_text().strip() in after[1]
    else:  # no group meets the protocol yet: no table, and both pages say so
        assert not (committed / "summary.csv").exists() and not (committed / "summary.md").exists()
        assert NO_GROUPS_README in after[0] and NO_GROUPS_RESULTS in after[1]
    assert "No group has closing FCFS runs yet" in after[1] or "closing / first" in after[1]


def test_no_group_gives_no_table_one_line_and_pages_that_say_so(tmp_path, monkeypatch, capsys):
    """`rtlm-reference target=scheduler` with an empty runs/ folder: no crash, one printed line, no summary files
    (a stale pair is removed), and the pages' markers say plainly that no group meets the protocol; adding a group
    afterwards brings the table back."""
    import rtlm_lab.paths
    import rtlm_lab.scheduler.analysis as analysis
    from omegaconf import OmegaConf

    from rtlm_lab.errors import UserError
    from rtlm_lab.report import NO_GROUPS_README, NO_GROUPS_RESULTS, write_scheduler_docs
    from rtlm_lab.tasks.reference import reference

    root, repo = tmp_path / "scheduler", tmp_path / "repo"
    (root / "runs").mkdir(parents=True)
    (root / "summary.csv").write_text("group,policy\nold,fcfs\n")  # stale, from groups since removed
    (root / "summary.md").write_text("| old |\n")
    (root / "headroom.png").write_bytes(b"old")
    (repo / "docs").mkdir(parents=True)
    (repo / "README.md").write_text("# R\n<!-- scheduler-summary:begin -->\n| old |\n<!-- scheduler-summary:end -->\n")
    (repo / "docs" / "results.md").write_text("<!-- scheduler-summary:begin -->\n| old |\n<!-- scheduler-summary:end -->\n"
                                              "<!-- fcfs-drift:begin -->\n<!-- fcfs-drift:end -->\n")
    monkeypatch.setattr(analysis, "reference_root", lambda: root)
    monkeypatch.setattr(rtlm_lab.paths, "ROOT", repo)
    cfg = OmegaConf.create({"target": {"name": "scheduler", "runs": [], "group": None, "note": "", "n_boot": 50}})
    df = reference(cfg)
    assert df.empty
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [analysis.NO_GROUPS] and out[0].startswith("no conforming groups")
    assert not (root / "summary.csv").exists() and not (root / "summary.md").exists()
    assert not (root / "headroom.png").exists()  # the stale figure goes with the table
    readme, results = (repo / "README.md").read_text(), (repo / "docs" / "results.md").read_text()
    assert "| old |" not in readme and NO_GROUPS_README in readme
    assert "| old |" not in results and NO_GROUPS_RESULTS in results and "No group has closing FCFS runs" in results
    # the same from no table at all (what the pages are rebuilt from without a build)
    assert sorted(write_scheduler_docs(root=root, repo=repo)) == sorted([repo / "README.md", repo / "docs" / "results.md"])
    assert (repo / "README.md").read_text() == readme
    # a group added: the table is back, and the line is gone
    rng = np.random.default_rng(9)
    base = rng.uniform(0.5, 1.5, 60)
    _run(root / "runs", "g", "fcfs", 0, base)
    _run(root / "runs", "g", "rtlm", 0, 2 * base)
    df = analysis.build(root, n_boot=50)
    assert len(df) == 2 and (root / "summary.csv").is_file()
    write_scheduler_docs(df, root=root, repo=repo)
    assert NO_GROUPS_README not in (repo / "README.md").read_text() and "2.00 [2.00, 2.00]" in (repo / "README.md").read_text()
    # a committed group whose summary.csv is missing is an error, not an empty table
    (root / "summary.csv").unlink()
    with pytest.raises(UserError, match="summary.csv"):
        write_scheduler_docs(root=root, repo=repo)
