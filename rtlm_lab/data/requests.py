"""The requests a ``data`` config names: the CCC corpus (``data=ccc``) or your own file (``data=prompts``).

Both give the columns of :func:`rtlm_lab.data.ccc.load_requests`: ``request_id, conv_id, turn_idx, text,
context, reply``.
"""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from rtlm_lab.errors import UserError

DATA_NAMES = ("ccc", "prompts")


def _n_prompts(d: Mapping[str, Any]) -> int | None:
    n = d.get("n_prompts")
    if n is None:
        return None
    try:
        return int(n)
    except (TypeError, ValueError) as exc:
        raise UserError(f"data.n_prompts must be a positive integer or null, got {n!r}") from exc


def load_data_requests(d: Mapping[str, Any]) -> pd.DataFrame:
    """Requests of a ``cfg.data`` mapping (``conf/data/ccc.yaml`` or ``conf/data/prompts.yaml``)."""
    name = str(d.get("name", "ccc"))
    n = _n_prompts(d)
    if name == "prompts":
        from rtlm_lab.data.prompts import load_prompts

        return load_prompts(d.get("path"), n=n, seed=int(d.get("sample_seed", 0)),
                            with_context=bool(d.get("with_context", True)), max_chars=d.get("max_chars"))
    if name == "ccc":
        from rtlm_lab.data.ccc import SplitSpec, load_requests

        spec = SplitSpec(train_frac=float(d.get("train_frac", 0.8)), val_frac=float(d.get("val_frac", 0.1)),
                         seed=int(d.get("split_seed", 0)))
        return load_requests(split=str(d.get("split", "test")), n=n, seed=int(d.get("sample_seed", 0)),
                             with_context=bool(d.get("with_context", False)), max_chars=d.get("max_chars"),
                             spec=spec)
    raise UserError(f"unknown data {name!r}; choose one of: {', '.join(DATA_NAMES)}")
