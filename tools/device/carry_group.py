"""Copy a committed run group's engine measurements into .device_carry/, so that a run added to the group on a
fresh GPU machine gets the group's arrival rate (the same service model / capacity) instead of measuring anew.

usage: python tools/device/carry_group.py GROUP [GROUP ...]   (GROUP: a folder of outputs/reference/scheduler/runs/)

* static path (metrics.json has ``service_model``): .device_carry/service/<lm>__<platform>[__offload].json, what
  ``calibration_cache`` reads (rtlm_lab/scheduler/harness.py);
* continuous engine (metrics.json has ``capacity``): .device_carry/capacity/<engine key>.json, what
  ``capacity_cache`` reads (rtlm_lab/scheduler/continuous.py), keyed by the engine config the run recorded.

job_round26.sh copies them into the box's caches before it runs. Every run of a group must agree (checked)."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from rtlm_lab.scheduler.continuous import engine_key  # noqa: E402

out = ROOT / ".device_carry"
for group in sys.argv[1:]:
    files = sorted((ROOT / "outputs/reference/scheduler/runs" / group).glob("*/metrics.json"))
    if not files:
        sys.exit(f"carry_group: no runs in group {group}")
    seen: dict[Path, str] = {}
    for f in files:
        m = json.loads(f.read_text())
        lm, plat = m["lm"] if isinstance(m["lm"], str) else m["lm"]["name"], str(m["platform"])
        want = {}
        if m.get("service_model"):
            want[out / "service" / f"{lm}__{plat}.json"] = m["service_model"]
            if m.get("offload_service_model"):
                want[out / "service" / f"{lm}__{plat}__offload.json"] = m["offload_service_model"]
        if isinstance(m.get("capacity"), dict):
            cap = m["capacity"]
            want[out / "capacity" / f"{engine_key(lm, plat, cap['engine'])}.json"] = cap
        for path, obj in want.items():
            text = json.dumps(obj, indent=1, sort_keys=True)
            if path in seen and seen[path] != text:
                sys.exit(f"carry_group: the runs of {group} disagree on {path.name} ({f.parent.name})")
            seen[path] = text
    for path, text in seen.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"{group}: {path.relative_to(ROOT)}")
