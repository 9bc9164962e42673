"""``rtlm-train-lm``: train one lab LM on CCC (Hydra entry point around :func:`rtlm_lab.lm.train.train_lab_lm`).

Examples::

    rtlm-train-lm lm=dialogpt_ccc preset=tiny
    rtlm-train-lm lm=godel_ccc preset=standard platform=cuda
    rtlm-train-lm -m lm=dialogpt_ccc,blenderbot_ccc,godel_ccc preset=standard platform=cuda

The model goes to ``data/models/lab/<lm>-<preset>/`` (with its own ``rtlm_manifest.json``); the Hydra run dir
gets a copy of ``metrics.json`` and ``manifest.json`` (its sha256, plus the model dir and the sha256 of the
model's manifest).
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
    from hydra.core.hydra_config import HydraConfig

    from rtlm_lab.io import sha256_file, write_run_manifest
    from rtlm_lab.lm.train import MANIFEST, output_dir_for, train_lab_lm

    if cfg.data.get("name", "ccc") != "ccc":
        from rtlm_lab.errors import UserError

        raise UserError(f"rtlm-train-lm trains on CCC prompt/reply pairs; data={cfg.data.name} has no replies "
                        f"(profile your prompts with rtlm-profile data={cfg.data.name} instead)")
    metrics = train_lab_lm(cfg)
    # the run dir holds a copy of metrics.json; the model itself lives in (and is checked by) its own
    # directory's rtlm_manifest.json, which this manifest pins by sha256
    model_dir = output_dir_for(cfg.lm.name, cfg.preset.name)
    write_run_manifest(HydraConfig.get().runtime.output_dir,
                       {"task": "train_lm", "model_dir": str(model_dir),
                        "model_manifest_sha256": sha256_file(model_dir / MANIFEST)})
    val = metrics.get("val", {})
    print(json.dumps({"lm": metrics.get("lm"), "preset": metrics.get("preset"), "val_loss": val.get("loss"),
                      "val_perplexity": val.get("perplexity")}))


main = make_main("train_lm", run)


if __name__ == "__main__":
    main()
