"""JupyterLab, headless: the server ``make lab`` starts lists the notebooks over its REST API and runs code in
the project kernel that ``make lab`` registers (here in a temporary prefix, not the user's home)."""

from __future__ import annotations

import json
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import ROOT
from lab_server import TOKEN, api as _api, install_kernel, lab


@pytest.fixture(scope="module")
def kernel_prefix(tmp_path_factory) -> tuple[Path, str, str]:
    """``make lab``'s kernel registration, into a temporary prefix instead of ``--user``."""
    return install_kernel(tmp_path_factory.mktemp("jupyter_prefix"))


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory, kernel_prefix):
    with lab(tmp_path_factory.mktemp("jupyter_home"), kernel_prefix[0]) as server:
        yield server


def test_lab_lists_the_notebooks_and_needs_the_token(lab_server):
    base, _ = lab_server
    status, page = _api(base, "/lab")  # the JupyterLab front end itself, not only jupyter_server
    assert status == 200 and b"JupyterLab" in page
    status, listing = _api(base, "/api/contents/")
    names = {c["name"] for c in listing["content"] if c["type"] == "notebook"}
    assert names == {p.name for p in (ROOT / "notebooks").glob("*.ipynb")} and len(names) >= 3
    status, nb = _api(base, "/api/contents/03_scheduler.ipynb")
    assert nb["type"] == "notebook" and nb["content"]["metadata"]["kernelspec"]["name"] == "python3"
    with pytest.raises(urllib.error.HTTPError) as err:  # no token, no access
        urllib.request.urlopen(f"{base}/api/contents/", timeout=10)
    assert err.value.code in (401, 403)


def test_project_kernel_runs_a_cell(lab_server, kernel_prefix):
    import websocket  # websocket-client

    base, _ = lab_server
    _, name, display = kernel_prefix
    specs = _api(base, "/api/kernelspecs")[1]["kernelspecs"]
    assert {"python3", name} <= set(specs) and specs[name]["spec"]["display_name"] == display
    assert Path(specs[name]["spec"]["argv"][0]).resolve() == Path(sys.executable).resolve()  # this venv
    status, kernel = _api(base, "/api/kernels", method="POST", body={"name": name})
    assert status == 201 and kernel["name"] == name
    ws = websocket.create_connection(f"ws://{base[7:]}/api/kernels/{kernel['id']}/channels?token={TOKEN}",
                                     timeout=60)
    try:
        msg_id = uuid.uuid4().hex
        code = "import sys, rtlm_lab; print(rtlm_lab.__name__, sys.prefix)"
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": uuid.uuid4().hex,
                       "username": "test", "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True}}))
        out, reply, deadline = "", None, time.monotonic() + 60
        while (reply is None or "rtlm_lab" not in out) and time.monotonic() < deadline:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                out += msg["content"]["text"]
            elif msg["msg_type"] == "error":
                pytest.fail("\n".join(msg["content"]["traceback"]))
            elif msg["msg_type"] == "execute_reply":
                reply = msg["content"]
    finally:
        ws.close()
        _api(base, f"/api/kernels/{kernel['id']}", method="DELETE")
    assert reply is not None and reply["status"] == "ok", reply
    assert out.split() == ["rtlm_lab", sys.prefix], out
    assert _api(base, "/api/kernels")[1] == []
