"""A real browser: notebook 01 run through JupyterLab's UI in headless Chromium (Selenium), its figures rendered.

JupyterLab starts as ``make lab`` does (``lab_server``: headless, token, free loopback port, the project kernel
registered in a temporary prefix). It serves a temporary folder holding a copy of
``notebooks/01_uncertainty_latency.ipynb`` whose only change is papermill's injected-parameters cell
(``output_dir`` into the test's tmp dir, so nothing is written into the checkout, and ``profile`` pinned to the
committed reference profile, so a larger profile of your own does not change what is run). The test clicks
Run > Run All Cells, waits until every code cell has an execution count and the kernel is idle, then checks
that no cell shows an error, that every figure is an ``<img>`` the browser decoded and that its pixels are
not blank, and saves a screenshot of the window (``notebook01.png`` in the tmp dir) and of each figure.

Needs Debian's ``chromium`` + ``chromium-driver`` (``/usr/bin/chromedriver``; browser downloads are not
reachable here) and ``selenium``; without them it skips and says which is missing. ``.ci/run`` installs
them as root. About 20 s on 2 cores.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import ROOT
from lab_server import TOKEN, api, install_kernel, lab

NOTEBOOK = ROOT / "notebooks" / "01_uncertainty_latency.ipynb"
PROFILE = ROOT / "outputs" / "reference" / "profiles" / "smollm2_135m__cpu.parquet"
CHROMEDRIVER = Path(os.environ.get("RTLM_CHROMEDRIVER", "/usr/bin/chromedriver"))
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
WINDOW = (1400, 1000)
RUN_TIMEOUT_S = 240
ERROR_TEXT = re.compile(r"Traceback \(most recent call last\)|^\w*(Error|Exception)\b", re.M)


def _chromium() -> str | None:
    env = os.environ.get("RTLM_CHROMIUM")
    return env if env and Path(env).is_file() else next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)


def _browser_or_skip():
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium binary (apt-get install chromium chromium-driver; .ci/run does it as root)")
    if not CHROMEDRIVER.is_file():
        pytest.skip(f"no chromedriver at {CHROMEDRIVER} (apt-get install chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(executable_path=str(CHROMEDRIVER)))


def _pixels(png: bytes) -> tuple[tuple[int, int], int, float]:
    """``(size, number of distinct colours, share of pixels that are not near-white)`` of a PNG."""
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGB")
    grey = im.convert("L")
    hist = grey.histogram()
    non_white = sum(hist[:240]) / (im.width * im.height)
    colours = im.getcolors(maxcolors=1 << 20)
    return im.size, (len(colours) if colours is not None else 1 << 20), non_white


@pytest.fixture
def notebook_copy(tmp_path) -> Path:
    """Notebook 01 with papermill's injected parameters (tmp ``output_dir``, the committed reference profile)."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    assert PROFILE.is_file(), "the committed reference profile is missing"
    nb = parameterize_notebook(load_notebook_node(str(NOTEBOOK)),
                               {"profile": str(PROFILE), "output_dir": str(tmp_path / "nb_outputs")})
    served = tmp_path / "served"
    served.mkdir()
    nbformat.write(nb, served / NOTEBOOK.name)
    return served / NOTEBOOK.name


def test_notebook01_runs_in_chromium_and_its_figures_render(tmp_path, notebook_copy):
    import nbformat

    driver = _browser_or_skip()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    n_code = sum(c.cell_type == "code" for c in nbformat.read(notebook_copy, as_version=4).cells)
    jdir = tmp_path / "jupyter_home"
    jdir.mkdir()
    # every cell in the page: JupyterLab 4 renders only the cells in view by default (windowing), and the checks
    # below count and read the cells' DOM
    settings = jdir / "lab-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    try:
        jupyter_path, _, _ = install_kernel(tmp_path / "jupyter_prefix")
        with lab(jdir, jupyter_path, root_dir=notebook_copy.parent) as (base, _):
            driver.get(f"{base}/lab/tree/{notebook_copy.name}?token={TOKEN}")
            wait = WebDriverWait(driver, 120, poll_frequency=0.5)
            wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".jp-NotebookPanel .jp-CodeCell")))

            def kernel_idle(_=None) -> bool:  # the notebook toolbar's indicator and the server agree
                ui = driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Notebook-ExecutionIndicator")
                kernels = api(base, "/api/kernels")[1]
                return (bool(ui) and ui[0].get_attribute("data-status") == "idle" and len(kernels) == 1
                        and kernels[0]["execution_state"] == "idle")

            wait.until(kernel_idle)
            assert len(driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-CodeCell")) == n_code

            # Run > Run All Cells, through the menu bar
            run_menu = wait.until(EC.element_to_be_clickable(
                (By.XPATH, "//div[contains(@class,'lm-MenuBar-itemLabel') and normalize-space()='Run']")))
            run_menu.click()
            wait.until(EC.element_to_be_clickable((By.XPATH, "//li[contains(@class,'lm-Menu-item')]"
                       "[.//div[contains(@class,'lm-Menu-itemLabel') and normalize-space()='Run All Cells']]"))).click()

            def prompts() -> list[str]:
                return [e.get_attribute("textContent").strip() for e in driver.find_elements(
                    By.CSS_SELECTOR, ".jp-NotebookPanel .jp-CodeCell .jp-InputArea-prompt")]

            def errors() -> list[str]:  # JupyterLab renders an error's traceback as stderr
                return [t for e in driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-OutputArea-output"
                                                        "[data-mime-type='application/vnd.jupyter.stderr']")
                        if ERROR_TEXT.search(t := e.get_attribute("textContent"))]

            def all_ran(_=None) -> bool:  # or stopped at an error: Run All does not run the cells below it
                p = prompts()
                done = len(p) == n_code and all(re.fullmatch(r"\[\d+\]:", s) for s in p)
                return (done or bool(errors())) and kernel_idle()

            run_start = time.monotonic()
            try:
                WebDriverWait(driver, RUN_TIMEOUT_S, poll_frequency=1).until(all_ran)
            except Exception:
                driver.save_screenshot(str(tmp_path / "timeout.png"))
                pytest.fail(f"cells did not all run within {RUN_TIMEOUT_S} s: prompts {prompts()}; "
                            f"server log tail:\n{(jdir / 'server.log').read_text()[-2000:]}")
            run_s = time.monotonic() - run_start
            err = errors()  # no cell shows an error
            assert not err, f"{len(err)} cell(s) show an error; the first:\n{err[0][-3000:]}"
            counts = [int(s[1:-2]) for s in prompts()]
            assert counts == sorted(counts) and len(set(counts)) == n_code, counts  # in order, each once

            # every figure is an <img> the browser decoded, and its pixels are not blank
            imgs = driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-OutputArea-output.jp-RenderedImage img")
            assert imgs, "no rendered image output"
            for i, img in enumerate(imgs):
                driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", img)
                wait.until(lambda d, img=img: d.execute_script(
                    "return arguments[0].complete && arguments[0].naturalWidth > 0", img))
                time.sleep(0.3)  # content-visibility: let the cell paint before the element screenshot
                png = img.screenshot_as_png
                (tmp_path / f"figure{i}.png").write_bytes(png)
                size, colours, non_white = _pixels(png)
                assert min(size) >= 100 and colours >= 8 and non_white >= 0.02, (i, size, colours, non_white)

            # a screenshot of the window with the first figure in view
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", imgs[0])
            time.sleep(0.5)
            shot = tmp_path / "notebook01.png"
            assert driver.save_screenshot(str(shot))
            size, colours, non_white = _pixels(shot.read_bytes())
            assert size[0] >= WINDOW[0] * 0.9 and size[1] >= WINDOW[1] * 0.6, size
            assert colours >= 16 and non_white >= 0.05, (colours, non_white)

            # save through the UI (Ctrl+S) and check the notebook on disk: as many image outputs as <img>s shown,
            # no error output
            driver.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Notebook").click()
            driver.find_element(By.TAG_NAME, "body").send_keys(Keys.CONTROL, "s")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                saved = nbformat.read(notebook_copy, as_version=4)
                outs = [o for c in saved.cells if c.cell_type == "code" for o in c.get("outputs", [])]
                if any("image/png" in o.get("data", {}) for o in outs):
                    break
                time.sleep(0.5)
            assert not [o for o in outs if o["output_type"] == "error"]
            assert sum("image/png" in o.get("data", {}) for o in outs) == len(imgs)
    finally:
        driver.quit()
    print(f"notebook 01 in Chromium: {n_code} code cells, {len(imgs)} figures, run {run_s:.1f} s; "
          f"screenshot {shot}")
