"""Real-browser test of a widget: JupyterLab serving a temporary copy of a small notebook,
headless Chromium from the system packages (/usr/bin/chromium; CI installs it with
`apt-get install -y chromium`), driven by Playwright's Python API (no `playwright install`).

The notebook (browser_fixtures/sampling_widget.ipynb) builds a SamplingExplorer on a fixed
toy distribution with top_k = 2. We run it in the browser, see "kept 2 tokens" rendered by
the kernel (kernel -> DOM), press End on the top_k slider's handle (DOM -> kernel) and see
the kernel's new answer, "kept 16 tokens", and a new continuation.

The second test does the same with a lesson notebook, labs/02_sampling_params.ipynb, on the
embedded model: it runs the whole notebook in the browser, then moves the explorer's top_k
slider to 1 with the keyboard and sees the kernel answer "kept 1 token".
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

CHROMIUM = "/usr/bin/chromium"
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NOTEBOOK = os.path.join(HERE, "browser_fixtures", "sampling_widget.ipynb")
LAB_NOTEBOOK = os.path.join(REPO, "labs", "02_sampling_params.ipynb")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"{CHROMIUM} is missing (CI installs it: apt-get install -y chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 (no token) serving a temporary copy of the notebook."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / "sampling_widget.ipynb")  # JupyterLab rewrites what it opens
    shutil.copy(LAB_NOTEBOOK, root / "02_sampling_params.ipynb")
    # no news toast over the widgets, and no "Select Kernel" dialog: start the notebook's kernel
    for ext, name, value in (("apputils-extension", "notification", {"fetchNews": "false", "checkForUpdates": False,
                                                                    "doNotDisturbMode": True}),
                             ("notebook-extension", "tracker", {"autoStartDefaultKernel": True})):
        d = tmp_path / "settings" / "@jupyterlab" / ext
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.jupyterlab-settings").write_text(json.dumps(value))
    port = _free_port()
    env = dict(os.environ)
    env["MPLBACKEND"] = "Agg"
    env["JUPYTER_CONFIG_DIR"] = str(tmp_path / "config")
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")
    log = open(tmp_path / "lab.log", "w")
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.port={port}",
           "--ServerApp.ip=127.0.0.1", "--IdentityProvider.token=", "--ServerApp.password=",
           "--ServerApp.disable_check_xsrf=True", "--LabApp.expose_app_in_browser=True",
           "--ServerApp.allow_root=True", f"--ServerApp.root_dir={root}",
           f"--LabApp.user_settings_dir={tmp_path / 'settings'}",
           f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}", "--ServerApp.port_retries=0"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield url, tmp_path
    finally:
        # stop the server we started (its own process group), then make sure
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        log.close()


def _open_and_run_all(page, url, name, sync_api):
    """Open a notebook in JupyterLab, wait for its kernel, and run every cell."""
    page.goto(f"{url}/lab/tree/{name}", timeout=60_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
    dialog = page.locator(".jp-Dialog .jp-mod-accept")  # in case the kernel dialog still shows
    if dialog.count():
        dialog.first.click()
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
    page.get_by_text(re.compile(r"\| Idle")).first.wait_for(timeout=60_000)  # the status bar
    for attempt in range(3):
        # fire and forget (the command's promise would wait on any dialog, with no
        # timeout); a run sent while the kernel's websocket is still connecting can be
        # dropped on a loaded machine, so run again if no cell started
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        try:
            page.locator(".jp-InputArea-prompt", has_text=re.compile(r"\[(\*|\d+)\]")).first.wait_for(
                timeout=15_000)
            return
        except sync_api.TimeoutError:
            continue


def test_slider_in_chromium_changes_the_output(lab):
    from playwright import sync_api  # a test dependency (pyproject [test]); only chromium may be missing
    url, tmp_path = lab
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.set_default_timeout(30_000)
            _open_and_run_all(page, url, "sampling_widget.ipynb", sync_api)
            kept = page.locator(".jp-OutputArea .widget-html .kept")
            sync_api.expect(kept).to_have_text(re.compile(r"kept 2 tokens"), timeout=60_000)  # kernel -> DOM
            cont = page.locator(".jp-OutputArea .widget-html .continuation")
            before = cont.inner_text()
            slider = page.locator(".jp-OutputArea .widget-slider", has_text="top_k")
            sync_api.expect(slider).to_have_count(1)
            handle = slider.locator(".noUi-handle")
            handle.focus()
            page.keyboard.press("End")  # DOM -> kernel: top_k to its maximum (16 tokens)
            sync_api.expect(kept).to_have_text(re.compile(r"kept 16 tokens"), timeout=30_000)
            sync_api.expect(slider.locator(".widget-readout")).to_have_text("16")
            # the continuation was regenerated: its widget updates after the summary's (two
            # messages), so wait for it rather than read it right after "kept 16" shows
            sync_api.expect(cont).not_to_have_text(before, timeout=30_000)
            assert page.locator(".jp-OutputArea .widget-image img, .jp-OutputArea img.widget-image").count() >= 1
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            print("screenshot:", tmp_path / "failure.png")
            print((tmp_path / "lab.log").read_text()[-3000:])
            raise
        finally:
            browser.close()


def test_lab_notebook_slider_in_chromium(lab):
    """labs/02_sampling_params.ipynb, run whole in the browser; top_k moved to 1 by keyboard."""
    from playwright import sync_api
    url, tmp_path = lab
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.set_default_timeout(30_000)
            _open_and_run_all(page, url, "02_sampling_params.ipynb", sync_api)
            # every code cell has run when no prompt shows [*] and the kernel is idle again
            sync_api.expect(page.locator(".jp-InputArea-prompt", has_text="[*]")).to_have_count(0, timeout=150_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
            assert page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                                has_text="Error").count() == 0
            kept = page.locator(".jp-OutputArea .widget-html .kept").first
            sync_api.expect(kept).to_have_text(re.compile(r"kept \d+ tokens"), timeout=30_000)
            before = kept.inner_text()
            slider = page.locator(".jp-OutputArea .widget-slider", has_text="top_k").first
            handle = slider.locator(".noUi-handle")
            handle.scroll_into_view_if_needed()
            handle.focus()
            page.keyboard.press("ArrowRight")  # -1 (off) -> 0 (also off)
            page.keyboard.press("ArrowRight")  # -> 1: only the most likely token survives
            sync_api.expect(slider.locator(".widget-readout")).to_have_text("1", timeout=30_000)
            sync_api.expect(kept).to_have_text(re.compile(r"kept 1 tokens?\b"), timeout=60_000)
            assert kept.inner_text() != before
        except Exception:
            page.screenshot(path=str(tmp_path / "failure-lab.png"))
            print("screenshot:", tmp_path / "failure-lab.png")
            print((tmp_path / "lab.log").read_text()[-3000:])
            raise
        finally:
            browser.close()
