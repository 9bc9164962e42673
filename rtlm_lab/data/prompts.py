"""Your own prompts as requests (``data=prompts data.path=<file>``), with the columns CCC requests have.

Formats, chosen by the file's extension:

* ``.txt``: one prompt a line; blank lines are skipped;
* ``.jsonl``: one JSON object a line with a ``text`` field, optional ``context`` (the previous turn),
  optional ``request_id`` and ``conversation_id``; blank lines are skipped;
* ``.csv``: a header with a ``text`` column, optional ``context``, ``request_id``, ``conversation_id``.

:func:`load_prompts` returns ``request_id, conv_id, turn_idx, text, context, reply`` like
:func:`rtlm_lab.data.ccc.load_requests`. Each prompt is its own conversation unless the file gives a
``conversation_id`` (prompts sharing one stay together in the by-conversation train/test splits). Generated
ids follow the CCC convention ``<conversation>-<turn:03d>`` (``p00007-000`` for the 8th prompt), so the
conversation is also what precedes the last ``-``. A bad file (missing, empty, no ``text``, an invalid JSON
line, an unknown extension, duplicate request ids) is a :class:`~rtlm_lab.errors.UserError`: one line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pandas as pd

from rtlm_lab.errors import UserError

FORMATS = (".txt", ".jsonl", ".csv")
COLUMNS = ["request_id", "conv_id", "turn_idx", "text", "context", "reply"]


def resolve_path(path: Any) -> Path:
    """``data.path`` as an absolute path (relative paths: from where the command was started)."""
    if path is None or str(path).strip() in ("", "None", "???"):
        raise UserError("data=prompts needs data.path=<file.jsonl|csv|txt> (your prompts)")
    return Path(str(path)).expanduser().resolve()


def _str(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None / NaN
        return ""
    return str(value).strip()


def _read_txt(p: Path) -> list[dict]:
    return [{"text": line.strip(), "line": i} for i, line in enumerate(_lines(p), 1) if line.strip()]


def _lines(p: Path) -> list[str]:
    try:
        return p.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise UserError(f"prompt file {p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _read_jsonl(p: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(_lines(p), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"prompt file {p}, line {i}: invalid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise UserError(f"prompt file {p}, line {i}: expected a JSON object with a \"text\" field, "
                            f"got {type(obj).__name__}")
        if "text" not in obj:
            raise UserError(f"prompt file {p}, line {i}: no \"text\" field (has: {', '.join(obj) or 'nothing'})")
        rows.append({**obj, "line": i})
    return rows


def _read_csv(p: Path) -> list[dict]:
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [h.strip() for h in (reader.fieldnames or [])]
            if not fields:
                return []
            if "text" not in fields:
                raise UserError(f"prompt file {p} has no 'text' column (columns: {', '.join(fields)})")
            return [{(k or "").strip(): v for k, v in row.items()} | {"line": i}
                    for i, row in enumerate(reader, 2)]
    except UnicodeDecodeError as exc:
        raise UserError(f"prompt file {p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise UserError(f"prompt file {p}: invalid CSV ({exc})") from exc


READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv}


def read_prompt_file(path: Any) -> pd.DataFrame:
    """Every prompt of the file, in file order, with its ids (see the module doc)."""
    p = resolve_path(path)
    ext = p.suffix.lower()
    if not p.is_file():
        raise UserError(f"prompt file {p} does not exist" if not p.exists() else f"prompt file {p} is not a file")
    if ext not in READERS:
        raise UserError(f"prompt file {p}: unknown extension {ext or '(none)'!r}; use one of {', '.join(FORMATS)}")
    raw = READERS[ext](p)
    rows = [r for r in raw if _str(r.get("text"))]
    if not rows:
        raise UserError(f"prompt file {p} holds no prompts" + (" (every text is empty)" if raw else ""))
    turns: dict[str, int] = {}
    out = []
    for k, r in enumerate(rows):
        conv = _str(r.get("conversation_id"))
        rid = _str(r.get("request_id"))
        if not conv:
            conv = rid or f"p{k:05d}"  # its own conversation
        turn = turns.get(conv, 0)
        turns[conv] = turn + 1
        out.append({"request_id": rid or f"{conv}-{turn:03d}", "conv_id": conv, "turn_idx": turn,
                    "text": _str(r["text"]), "context": _str(r.get("context")), "reply": ""})
    df = pd.DataFrame(out, columns=COLUMNS)
    dup = df["request_id"][df["request_id"].duplicated()]
    if len(dup):
        line = rows[int(dup.index[0])]["line"]
        raise UserError(f"prompt file {p}, line {line}: request_id {dup.iloc[0]!r} appears twice")
    return df


def load_prompts(path: Any, n: int | None = None, seed: int = 0, with_context: bool = True,
                 max_chars: int | None = None) -> pd.DataFrame:
    """Requests from a prompt file: columns ``request_id, conv_id, turn_idx, text, context, reply``.

    ``n`` draws a seeded sample (nested, as for CCC); ``None`` keeps every prompt in file order;
    ``with_context=False`` blanks the context column; ``max_chars`` drops longer prompts.
    """
    if n is not None and n <= 0:
        raise UserError(f"data.n_prompts must be positive, got {n}")
    df = read_prompt_file(path)
    if max_chars:
        kept = df[df["text"].str.len() <= int(max_chars)]
        if not len(kept):
            raise UserError(f"every prompt of {resolve_path(path)} is longer than data.max_chars={max_chars}")
        df = kept
    if n is not None and n < len(df):
        df = df.sample(frac=1.0, random_state=seed).head(n)
    df = df.reset_index(drop=True)
    if not with_context:
        df["context"] = ""
    return df


def export_ccc(dst_dir: Any, n: int = 500, splits: tuple[str, ...] = ("train", "test")) -> list[Path]:
    """Write the seeded ``n``-turn CCC samples of ``splits`` (``conf/data/ccc.yaml``'s defaults) as prompt files
    ``<dst_dir>/<split>.jsonl`` with their request and conversation ids, for machines without the corpus
    (``make spread-prompts``: the GPU box's ``rtlm-spread``); the same ids as ``data=ccc data.split=<split>
    data.n_prompts=<n>``, so results join the committed profiles."""
    import json

    from rtlm_lab.data.ccc import load_requests
    from rtlm_lab.io import atomic_path

    out = []
    for split in splits:
        df = load_requests(split=split, n=n)
        path = Path(dst_dir) / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            for r in df.itertuples(index=False):
                f.write(json.dumps({"text": r.text, "context": r.context, "request_id": r.request_id,
                                    "conversation_id": r.conv_id}) + "\n")
        out.append(path)
    return out
