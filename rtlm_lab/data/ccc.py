"""The CCC chit-chat corpus (PyPI ``chitchat-dataset``, MIT) as requests for the lab.

Each conversation is a list of *turns*; a turn is one or more consecutive messages of one speaker, joined
with a space. A **request** is one turn (the "user" turn an LM must answer); its *context* is the
previous turn and its *reference reply* the next turn (used to train the lab LMs). Splits are by
conversation (no conversation spans two splits), seeded.

The corpus is read through Hugging Face ``datasets`` and cached as parquet under ``data/processed/``
with a JSON sidecar holding counts and provenance; the cache is rebuilt when the split settings change
or when it is unreadable.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rtlm_lab.errors import UserError
from rtlm_lab.io import provenance, sha256_file, write_json_atomic, write_parquet_atomic
from rtlm_lab.paths import processed_dir

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CACHE_VERSION = 1


@dataclass(frozen=True)
class SplitSpec:
    """How conversations are divided: fractions for train/val (test takes the rest) and the seed."""

    train_frac: float = 0.8
    val_frac: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        if not (0 < self.train_frac < 1 and 0 <= self.val_frac < 1 and self.train_frac + self.val_frac < 1):
            raise UserError(f"data split fractions must satisfy 0 < train, 0 <= val, train + val < 1; "
                            f"got train={self.train_frac} val={self.val_frac}")

    def tag(self) -> str:
        return f"s{self.seed}_tr{self.train_frac:g}_va{self.val_frac:g}_v{CACHE_VERSION}"


def _dataset_json() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.origin:
        raise UserError("package chitchat-dataset is not installed; run `make setup`")
    return Path(spec.origin).parent / "dataset.json"


def _iter_turns(path: Path):
    """Yield one row per turn of every conversation, in corpus order."""
    with open(path) as f:
        raw = json.load(f)
    for conv_id, conv in raw.items():
        turns = conv.get("messages", [])
        texts = [" ".join(m["text"].strip() for m in turn if m.get("text")).strip() for turn in turns]
        senders = [turn[0]["sender"] if turn else "" for turn in turns]
        first = senders[0] if senders else ""
        for i, text in enumerate(texts):
            yield {
                "conv_id": conv_id,
                "turn_idx": i,
                "speaker": "A" if senders[i] == first else "B",
                "text": text,
                "context": texts[i - 1] if i > 0 else "",
                "reply": texts[i + 1] if i + 1 < len(texts) else "",
                "n_messages": len(turns[i]),
            }


def build_corpus(spec: SplitSpec = SplitSpec(), force: bool = False) -> Path:
    """Build (once) ``data/processed/ccc_turns_<tag>.parquet`` with a ``split`` column; return its path."""
    spec.validate()
    out = processed_dir() / f"ccc_turns_{spec.tag()}.parquet"
    meta_path = out.with_suffix(".json")
    if out.exists() and meta_path.exists() and not force:
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("sha256") == sha256_file(out):
                return out
            log.warning("CCC cache %s does not match its checksum; rebuilding", out)
        except (OSError, ValueError):
            log.warning("CCC cache sidecar %s is unreadable; rebuilding", meta_path)
    import datasets

    src = _dataset_json()
    log.info("building CCC turns from %s", src)
    import tempfile

    processed_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=processed_dir()) as hf_cache:  # datasets' arrow cache: throwaway
        ds = datasets.Dataset.from_generator(_iter_turns, gen_kwargs={"path": src}, keep_in_memory=True,
                                             cache_dir=hf_cache)
        df = ds.to_pandas()
    df = df[df["text"].str.len() > 0].reset_index(drop=True)
    convs = np.array(sorted(df["conv_id"].unique()))
    rng = np.random.default_rng(spec.seed)
    rng.shuffle(convs)
    n_train = int(round(spec.train_frac * len(convs)))
    n_val = int(round(spec.val_frac * len(convs)))
    split_of = {c: "train" for c in convs[:n_train]}
    split_of.update({c: "val" for c in convs[n_train:n_train + n_val]})
    split_of.update({c: "test" for c in convs[n_train + n_val:]})
    df.insert(0, "split", df["conv_id"].map(split_of))
    df.insert(0, "request_id", [f"{c[:8]}-{t:03d}" for c, t in zip(df["conv_id"], df["turn_idx"])])
    write_parquet_atomic(df, out)
    counts = {s: {"conversations": int((pd.Series(list(split_of.values())) == s).sum()),
                  "turns": int((df["split"] == s).sum())} for s in SPLITS}
    write_json_atomic(meta_path, {
        "source": f"PyPI chitchat-dataset==0.9.0 ({src.name}, sha256 {sha256_file(src)})",
        "licence": "MIT",
        "split": asdict(spec),
        "counts": counts,
        "n_turns": int(len(df)),
        "sha256": sha256_file(out),
        "provenance": provenance(),
    })
    return out


def load_turns(spec: SplitSpec = SplitSpec()) -> pd.DataFrame:
    """All turns with their split (cached)."""
    path = build_corpus(spec)
    try:
        return pd.read_parquet(path)
    except Exception:  # noqa: BLE001 - a corrupt cache is rebuilt, not fatal
        log.warning("CCC cache %s unreadable; rebuilding", path)
        return pd.read_parquet(build_corpus(spec, force=True))


def load_requests(split: str = "test", n: int | None = None, seed: int = 0, with_context: bool = False,
                  max_chars: int | None = 600, spec: SplitSpec = SplitSpec()) -> pd.DataFrame:
    """Requests of one split: columns ``request_id, conv_id, turn_idx, text, context``.

    ``n`` draws a seeded sample (without replacement; nested: a larger ``n`` extends a smaller one); ``with_context=False`` blanks
    the context column; ``max_chars`` drops turns longer than that (pasted essays, a few dozen).
    """
    if split not in SPLITS:
        raise UserError(f"unknown data split {split!r}; choose one of {', '.join(SPLITS)}")
    if n is not None and n <= 0:
        raise UserError(f"data.n_prompts must be positive, got {n}")
    df = load_turns(spec)
    df = df[df["split"] == split]
    if max_chars:
        df = df[df["text"].str.len() <= max_chars]
    # a seeded permutation, then its first n: samples are nested (n=300 is a prefix of n=500), so runs of
    # different sizes (e.g. cpu and cuda reference profiles) share their requests
    df = df.sample(frac=1.0, random_state=seed)
    if n is not None and n < len(df):
        df = df.head(n)
    df = df[["request_id", "conv_id", "turn_idx", "text", "context", "reply"]].reset_index(drop=True)
    if not with_context:
        df["context"] = ""
    return df


def corpus_stats(spec: SplitSpec = SplitSpec()) -> dict:
    """Counts written beside the cache (conversations and turns per split)."""
    path = build_corpus(spec)
    return json.loads(path.with_suffix(".json").read_text())


def main() -> None:  # pragma: no cover - thin CLI
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stats = corpus_stats()
    print(json.dumps({k: stats[k] for k in ("source", "split", "counts", "n_turns")}, indent=2))


if __name__ == "__main__":
    main()
