"""Set-up step: convert the GGUF LMs to their safetensors caches, once.

``python -m rtlm_lab.lm.convert [lm ...]`` (default: ``gemma3_270m``, the embedded default) runs
:func:`rtlm_lab.lm.loader.gguf_cache_dir` for each named ``source: gguf`` LM: the GGUF file from
:mod:`rtlm_lab.data.assets` dequantized by transformers into ``data/models/gguf/<name>-<sha12>/`` with a
sha256 manifest. A load would convert it anyway (~1 min on 2 cores); the Makefile's set-up runs this step
after ``python -m rtlm_lab.data.assets`` so that ``make demo`` and the first notebook run do not pay it. An
intact cache is kept as is, so the step is idempotent.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from rtlm_lab.errors import UserError, user_errors
from rtlm_lab.lm.loader import gguf_cache_dir, lm_config

DEFAULT_LMS = ("gemma3_270m",)


def convert(names: Sequence[str] = DEFAULT_LMS) -> dict:
    """``{lm: cache dir}`` for each named LM (each must be ``source: gguf``)."""
    out = {}
    for name in names:
        spec = lm_config(name)
        if spec.get("source") != "gguf":
            raise UserError(f"lm {name!r} is not a GGUF LM (source={spec.get('source')!r}): nothing to convert")
        out[name] = gguf_cache_dir(spec)
    return out


@user_errors
def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = list(sys.argv[1:] if argv is None else argv) or list(DEFAULT_LMS)
    for name, path in convert(names).items():
        print(f"{name} safetensors: {path}")


if __name__ == "__main__":
    main()
