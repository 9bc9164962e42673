"""JupyterLab as ``make lab`` starts it, for the tests: headless, on a free loopback port, with a token, and
the project kernel registered the way the Makefile does it but into a temporary prefix (not ``--user``).
Used by ``test_jupyterlab.py`` (REST API + kernel websocket) and ``test_browser.py`` (headless Chromium)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from conftest import ROOT

TOKEN = uuid.uuid4().hex
MAKEFILE_INSTALL = re.compile(r"ipykernel install --user --name (\S+) --display-name \"([^\"]+)\"")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base, path, method="GET", body=None, timeout=30):
    """``(status, JSON or raw bytes)`` of one authenticated request to the server at ``base``."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{base}{path}", method=method, data=data,
                                 headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
        return r.status, (json.loads(raw) if raw and "json" in r.headers.get("Content-Type", "") else raw)


def install_kernel(prefix: Path) -> tuple[Path, str, str]:
    """``make lab``'s kernel registration, into ``prefix`` instead of ``--user``: ``(JUPYTER_PATH entry, name,
    display name)``."""
    name, display = MAKEFILE_INSTALL.search((ROOT / "Makefile").read_text()).groups()
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(prefix), "--name", name,
                    "--display-name", display], check=True, capture_output=True, timeout=120)
    return prefix / "share" / "jupyter", name, display


@contextlib.contextmanager
def lab(jdir: Path, jupyter_path: Path, root_dir: Path = ROOT / "notebooks"):
    """``jupyter lab`` serving ``root_dir`` (default: ``notebooks/``, as ``make lab``), its config, data, runtime,
    settings and workspaces in ``jdir``; yields ``(base URL, process)`` once ``/api/status`` answers, and shuts
    the server down afterwards (its log: ``jdir/server.log``)."""
    port = free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(jdir / "config"), "JUPYTER_DATA_DIR": str(jdir / "data"),
           "JUPYTER_RUNTIME_DIR": str(jdir / "runtime"), "JUPYTER_PATH": str(jupyter_path),
           "JUPYTERLAB_SETTINGS_DIR": str(jdir / "lab-settings"), "JUPYTERLAB_WORKSPACES_DIR": str(jdir / "ws")}
    log = open(jdir / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root_dir}",
         "--ServerApp.open_browser=False", "--LabApp.news_url=", "--LabApp.check_for_updates_class="
         "jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        cwd=root_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if api(base, "/api/status", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("jupyter lab did not start:\n" + (jdir / "server.log").read_text()[-3000:])
            time.sleep(0.3)
        yield base, proc
    finally:
        if proc.poll() is None:
            try:
                api(base, "/api/shutdown", method="POST", body={}, timeout=5)
                proc.wait(20)
            except Exception:  # noqa: BLE001 - fall back to a signal
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        log.close()
