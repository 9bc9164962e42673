"""``rtlm-profile``: real greedy generation for each request (a CCC sample or your own prompt file,
``data=prompts data.path=...``), one parquet row each; ``conv_id`` keeps each request's conversation for
the by-conversation splits downstream.

Rows are flushed to ``parts/part-NNNNN.parquet`` (atomically) every ``profile.flush_every`` requests and
when the run is interrupted (Ctrl-C / SIGTERM), so a rerun of the same command skips every finished
request; the consolidated ``profile.parquet`` and ``summary.json`` are written at the end.

Latency is measured at ``profile.batch_size`` (1 by default: isolated service time). With a batch size
above one, ``ttft_s``/``e2e_s`` are those of the batch and only the token counts are per request; the
test suite checks that batched greedy decoding gives the same token counts as batch 1.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
from tqdm.auto import tqdm

from rtlm_lab.data.requests import load_data_requests
from rtlm_lab.errors import UserError
from rtlm_lab.io import git_commit, provenance, write_json_atomic, write_parquet_atomic

log = logging.getLogger(__name__)

PROFILE_COLUMNS = [
    "request_id", "conv_id", "text", "context", "n_input_tokens", "n_output_tokens", "ttft_s", "e2e_s",
    "ms_per_token", "stop_reason", "batch_size", "reply", "lm", "platform", "device", "decoding", "git_commit", "seed",
    "finished_utc",
]
#: Optional column (``profile.output_ids=N``, N > 0): the reply's first N token ids (list of int), the
#: teacher-forcing prefix of :mod:`rtlm_lab.regressor.lmstate`'s remaining-length refinement.
OUTPUT_IDS_COLUMN = "output_ids"


class ProfileStore:
    """Append-only store of profile rows under ``<run_dir>/parts``; survives interruption. ``columns``: the
    columns every part is written with (default the profile's; ``None``: the rows' own, e.g. rtlm-spread's)."""

    def __init__(self, run_dir: str | Path, columns: list[str] | None = PROFILE_COLUMNS):
        self.columns = columns
        self.run_dir = Path(run_dir)
        self.parts = self.run_dir / "parts"
        self.parts.mkdir(parents=True, exist_ok=True)
        self._buffer: list[dict] = []

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet"))

    def load(self) -> pd.DataFrame:
        frames = []
        for p in self._part_files():
            try:
                frames.append(pd.read_parquet(p))
            except Exception:  # noqa: BLE001 - a torn/corrupt part is redone, never fatal
                log.warning("ignoring unreadable part %s (its requests will be redone)", p.name)
                p.rename(p.with_suffix(".corrupt"))
        if not frames:
            return pd.DataFrame(columns=self.columns or ["request_id"])
        df = pd.concat(frames, ignore_index=True)
        return df.drop_duplicates("request_id", keep="first").reset_index(drop=True)

    def done_ids(self) -> set[str]:
        return set(self.load()["request_id"])

    def add(self, rows: list[dict], flush_every: int) -> None:
        self._buffer.extend(rows)
        if len(self._buffer) >= flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        existing = self._part_files()
        idx = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        path = self.parts / f"part-{idx:05d}.parquet"
        # take the rows out of the buffer first: an interruption landing after the rename (but before the
        # buffer was cleared) used to make the final flush write the same rows again as a second part
        rows, self._buffer = self._buffer, []
        try:
            cols = None if self.columns is None else (
                self.columns + ([OUTPUT_IDS_COLUMN] if rows and OUTPUT_IDS_COLUMN in rows[0] else []))
            write_parquet_atomic(pd.DataFrame(rows, columns=cols), path)
        except BaseException:
            if not path.exists():  # not written: keep the rows for the next flush
                self._buffer = rows + self._buffer
            raise


@contextmanager
def _sigterm_as_interrupt():
    """Treat SIGTERM like Ctrl-C so that finished rows are flushed before exit."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    cur = cfg
    for part in key.split("."):
        if cur is None:
            return default
        cur = cur.get(part) if hasattr(cur, "get") else getattr(cur, part, None)
    return default if cur is None else cur


def select_requests(cfg: Mapping) -> pd.DataFrame:
    """The requests of ``cfg.data``: a CCC sample (``data=ccc``) or your own file (``data=prompts``)."""
    return load_data_requests(cfg["data"])


def check_batch1(lm, requests: pd.DataFrame, batch_size: int) -> dict:
    """Token counts of the same requests generated one at a time and in batches (greedy): agreement."""
    texts, ctx = requests["text"].tolist(), requests["context"].tolist()
    single = [lm.generate([t], [c])[0].n_output_tokens for t, c in zip(texts, ctx)]
    batched = []
    for i in range(0, len(texts), batch_size):
        batched += [g.n_output_tokens for g in lm.generate(texts[i:i + batch_size], ctx[i:i + batch_size])]
    same = [a == b for a, b in zip(single, batched)]
    return {"n": len(same), "identical": int(sum(same)),
            "mismatches": [{"request_id": r, "batch1": a, "batched": b}
                           for r, a, b, ok in zip(requests["request_id"], single, batched, same) if not ok]}


def run_profile(cfg: Mapping, run_dir: str | Path, lm=None) -> dict:
    """Profile ``cfg.data`` requests with ``cfg.lm`` on ``cfg.platform``; return the summary dict.

    ``lm`` may be a preloaded :class:`~rtlm_lab.lm.ChatLM` (tests, notebooks).
    """
    from rtlm_lab.lm import load_lm
    from rtlm_lab.lm.sanity import check_sanity
    from rtlm_lab.profiling.summary import summarize

    run_dir = Path(run_dir)
    prof = cfg.get("profile", {}) or {}
    batch_size = int(prof.get("batch_size", 1))
    flush_every = max(1, int(prof.get("flush_every", 10)))
    n_ids = int(prof.get("output_ids", 0) or 0)
    if batch_size < 1:
        raise UserError(f"profile.batch_size must be >= 1, got {batch_size}")
    requests = select_requests(cfg)
    store = ProfileStore(run_dir)
    done = store.done_ids()
    todo = requests[~requests["request_id"].isin(done)].reset_index(drop=True)
    log.info("%d requests: %d already profiled, %d to go", len(requests), len(requests) - len(todo), len(todo))

    lm_cfg, platform = dict(cfg["lm"]), dict(cfg["platform"])
    sanity = None
    if len(todo):
        if lm is None:
            lm = load_lm(lm_cfg, platform)
        if prof.get("sanity_check", True):
            sanity = check_sanity(lm, platform.get("name", ""))
            if sanity:
                log.info("sanity check passed: %r -> %r", sanity["prompt"], sanity["got"])
        for _ in range(int(prof.get("warmup", 1))):
            lm.generate(["hello, how are you?"], max_new_tokens=4)
    batch1 = None
    n_check = int(prof.get("check_batch1", 0) or 0)
    if batch_size > 1 and n_check > 0 and len(todo):
        batch1 = check_batch1(lm, todo.head(min(n_check, len(todo))), batch_size)
        log.info("batched vs batch-1 token counts: %d/%d identical", batch1["identical"], batch1["n"])
    used = dict(getattr(lm, "spec", None) or lm_cfg)  # as loaded: chat_format / stop_strings "auto" resolved
    decoding = json.dumps({"greedy": True, "max_new_tokens": int(lm_cfg.get("max_new_tokens", 64)),
                           "chat_format": used.get("chat_format"), "stop_strings": used.get("stop_strings", []),
                           "with_context": bool(cfg["data"].get("with_context", False))})
    commit, seed = git_commit(), int(cfg.get("seed", 0))
    device = str(getattr(lm, "device", platform.get("device", "cpu")))

    t0 = time.perf_counter()
    with _sigterm_as_interrupt():
        try:
            bar = tqdm(total=len(todo), desc=f"profile {lm_cfg['name']}@{platform.get('name')}", unit="req")
            for start in range(0, len(todo), batch_size):
                chunk = todo.iloc[start:start + batch_size]
                gens = lm.generate(chunk["text"].tolist(), chunk["context"].tolist())
                now = pd.Timestamp.now(tz="UTC").isoformat()
                rows = []
                for (_, req), g in zip(chunk.iterrows(), gens):
                    rows.append({
                        "request_id": req["request_id"], "conv_id": req["conv_id"], "text": req["text"],
                        "context": req["context"],
                        "n_input_tokens": g.n_input_tokens, "n_output_tokens": g.n_output_tokens,
                        "ttft_s": g.ttft_s, "e2e_s": g.e2e_s, "ms_per_token": g.ms_per_token,
                        "stop_reason": g.stop_reason, "batch_size": g.batch_size, "reply": g.text,
                        "lm": lm_cfg["name"], "platform": platform.get("name"), "device": device,
                        "decoding": decoding, "git_commit": commit, "seed": seed, "finished_utc": now,
                    })
                    if n_ids > 0:
                        rows[-1][OUTPUT_IDS_COLUMN] = [int(t) for t in g.output_ids[:n_ids]]
                store.add(rows, flush_every)
                bar.update(len(rows))
            bar.close()
        finally:
            store.flush()

    df = store.load()
    order = {rid: i for i, rid in enumerate(requests["request_id"])}
    df = df[df["request_id"].isin(order)].sort_values("request_id", key=lambda s: s.map(order))
    df = df.reset_index(drop=True)
    write_parquet_atomic(df, run_dir / "profile.parquet")
    summary = summarize(df)
    summary.update({"lm": lm_cfg["name"], "platform": platform.get("name"), "wall_s": time.perf_counter() - t0,
                    "sanity": sanity, "batch_size": batch_size, "batch1_check": batch1})
    write_json_atomic(run_dir / "summary.json", {"summary": summary, "provenance": provenance(cfg)})
    return summary
