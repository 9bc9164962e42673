"""``rtlm-train-lm``: train one lab LM on CCC (Hydra entry point around :func:`rtlm_lab.lm.train.train_lab_lm`).

Examples::

    rtlm-train-lm lm=dialogpt_ccc preset=tiny
    rtlm-train-lm lm=godel_ccc preset=standard platform=cuda
    rtlm-train-lm -m lm=dialogpt_ccc,blenderbot_ccc,godel_ccc preset=standard platform=cuda
"""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig

from rtlm_lab.tasks._cli import make_main, task_wrapper

log = logging.getLogger(__name__)


@task_wrapper
def run(cfg: DictConfig) -> None:
    """Train (or reuse) the configured lab LM and print its validation metrics."""
    from rtlm_lab.lm.train import train_lab_lm

    metrics = train_lab_lm(cfg)
    val = metrics.get("val", {})
    print(json.dumps({"lm": metrics.get("lm"), "preset": metrics.get("preset"), "val_loss": val.get("loss"),
                      "val_perplexity": val.get("perplexity")}))


main = make_main("train_lm", run)


if __name__ == "__main__":
    main()
