"""The served page (``covidlesionseg serve``) in Debian's Chromium, driven by Playwright.

The browser tests skip with the reason when trame-slicer (the web extra), playwright or /usr/bin/chromium is
absent. Playwright never downloads a browser here: it launches Debian's Chromium by its path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("COVIDLESIONSEG_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def browser_missing() -> str | None:
    for module, what in (("trame_slicer", 'trame-slicer (pip install -e ".[web]")'),
                         ("playwright", "playwright (pip install playwright; no browser download needed)")):
        if importlib.util.find_spec(module) is None:
            return f"{what} is not installed"
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is absent (apt-get install -y chromium)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``covidlesionseg serve`` process (its stdout's first line says where its session folder is)."""

    def __init__(self, data: Path, log: Path, max_upload_mb: float = 64):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "COVIDLesionSegLib.cli", "serve", "--port", str(self.port), "--data", str(data),
             "--max-upload-mb", str(max_upload_mb)],
            stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        first = self.process.stdout.readline()
        if not first:
            raise RuntimeError(f"the server did not start: {log.read_text()[-3000:]}")
        self.session_folder = Path(json.loads(first)["session_folder"])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()[-3000:]}")
            time.sleep(0.3)
        raise RuntimeError("the server did not listen within 120 s")

    def stop(self) -> int:
        """Ctrl-C, as a user stops it; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory) -> Path:
    """The data folder the server offers: the small phantom as NIfTI, and a finer one (8 times the voxels) that
    takes long enough to segment for Cancel to be pressed while it runs."""
    import SimpleITK as sitk

    from COVIDLesionSegLib import phantom

    folder = tmp_path_factory.mktemp("web-data")
    image, _ = phantom.make_chest_phantom()
    sitk.WriteImage(image, str(folder / "phantom.nii.gz"))
    fine, _ = phantom.make_chest_phantom(shape_zyx=(128, 256, 256), spacing_zyx=(2.0, 1.4, 1.4))
    sitk.WriteImage(fine, str(folder / "fine_phantom.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def server(phantom_data, tmp_path_factory):
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    srv = Server(phantom_data, tmp_path_factory.mktemp("web-log") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1500, "height": 900}, accept_downloads=True)
        page.goto(server.url)
        page.wait_for_selector("#cls-panel", timeout=120_000)
        yield page
        browser.close()
