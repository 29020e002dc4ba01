"""Fixtures for the browser tests: a throw-away JupyterLab server and Debian's Chromium.

``jupyter_lab`` starts JupyterLab headless on a free localhost port with a fresh config,
data, runtime and settings folder (nothing from ``~/.jupyter`` leaks in, no news or update
checks reach the network), serving a temporary copy of ``notebooks/``; it waits until the
server answers and shuts it down in every case: the REST shutdown first (which stops the
kernels), then SIGTERM / SIGKILL to the server's process group and to every process it started
(kernels run in sessions of their own, so the group alone would miss them).

With ``$WANSTUDIO_UI_PIDFILE`` set, the server's process id is written there while it runs (a
process group of its own; its kernels are its children), so a CI script can stop it even when
pytest itself is killed.

``screenshots`` is where the tests save theirs: ``docs/screenshots/`` (README shows them), or
``$WANSTUDIO_SCREENSHOTS``.

``page`` is a 1280x800 page of a headless Chromium (``$WANSTUDIO_CHROMIUM``, default
``/usr/bin/chromium``) with background networking off and an empty profile.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
SCREENSHOTS = Path(os.environ.get("WANSTUDIO_SCREENSHOTS", ROOT / "docs" / "screenshots"))
CHROMIUM = os.environ.get("WANSTUDIO_CHROMIUM", "/usr/bin/chromium")
VIEWPORT = {"width": 1280, "height": 800}
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
START_TIMEOUT = 120.0  # seconds for JupyterLab to answer

# JupyterLab settings of the fresh profile: no news, no update checks (no network), no
# notification toasts over the screenshots, and every cell attached and rendered (the default
# 'contentVisibility' windowing skips rendering cells out of view, so reading a panel's text
# right after scrolling to it could find it empty).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
        "doNotDisturbMode": True,
    },
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


@dataclass
class JupyterLab:
    url: str  # http://127.0.0.1:PORT
    token: str
    root: Path  # the folder it serves (a copy of notebooks/)
    log: Path
    proc: subprocess.Popen

    def lab_url(self, path: str = "", workspace: str | None = None) -> str:
        """The page that opens ``path``; with ``workspace``, in that workspace, reset (so only
        this document is open, whatever an earlier page left)."""
        if workspace is None:
            return f"{self.url}/lab/tree/{path}?token={self.token}"
        return f"{self.url}/lab/workspaces/{workspace}/tree/{path}?token={self.token}&reset"

    def api(self, path: str, method: str = "GET", timeout: float = 5.0):
        request = urllib.request.Request(
            f"{self.url}/api/{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list:
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:  # psutil missing or the process is gone
        return []


def stop_server(lab: JupyterLab) -> None:
    """Shut JupyterLab and its kernels down, whatever state they are in."""
    children = _descendants(lab.proc.pid)
    if lab.proc.poll() is None:
        with contextlib.suppress(Exception):
            lab.api("shutdown", method="POST", timeout=5)  # stops the kernels too
        with contextlib.suppress(subprocess.TimeoutExpired):
            lab.proc.wait(10)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if lab.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(lab.proc.pid, sig)  # the server's own group (start_new_session)
            with contextlib.suppress(subprocess.TimeoutExpired):
                lab.proc.wait(5)
    for child in children:  # kernels: their own sessions, so not in the group
        with contextlib.suppress(Exception):
            if child.is_running():
                child.kill()
                child.wait(5)


@pytest.fixture(scope="session")
def jupyter_lab(tmp_path_factory):
    pytest.importorskip("jupyterlab", reason="pip install -e '.[studio]'")
    home = tmp_path_factory.mktemp("jupyter")
    root = home / "notebooks"
    shutil.copytree(NOTEBOOKS, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    config = home / "config"
    settings = config / "lab" / "user-settings"
    for name, values in LAB_SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    # no real weights (the tiny preset), videos in ./outputs of the served copy (as a person
    # gets them: the panel shows outputs/infinitetalk.mp4)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WANSTUDIO_WEIGHTS", "WANSTUDIO_OUTPUT", "JUPYTER_PATH")
    }
    env.update(
        JUPYTER_CONFIG_DIR=str(config),
        JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
        IPYTHONDIR=str(home / "ipython"),
        XDG_CONFIG_HOME=str(home / "xdg"),
        MPLCONFIGDIR=str(home / "mpl"),
        MPLBACKEND="Agg",
        JUPYTER_PLATFORM_DIRS="1",
        PYTHONWARNINGS="ignore::DeprecationWarning",
    )
    port, token = free_port(), secrets.token_hex(16)
    log = home / "jupyterlab.log"
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ServerApp.open_browser=False",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        "--ServerApp.allow_root=True",
        f"--ServerApp.root_dir={root}",
        "--ServerApp.terminals_enabled=False",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    lab = JupyterLab(url=f"http://127.0.0.1:{port}", token=token, root=root, log=log, proc=proc)
    pidfile = os.environ.get("WANSTUDIO_UI_PIDFILE")  # .ci/run's trap stops it if pytest is killed
    if pidfile:
        Path(pidfile).write_text(f"{proc.pid}\n")
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {proc.returncode}:\n{lab.log_tail()}")
            try:
                lab.api("status", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"JupyterLab did not answer in {START_TIMEOUT:.0f} s:\n{lab.log_tail()}"
                    ) from None
                time.sleep(0.5)
        yield lab
    finally:
        stop_server(lab)
        if pidfile:
            with contextlib.suppress(OSError):
                os.unlink(pidfile)


@pytest.fixture(scope="session")
def browser_context(tmp_path_factory):
    """Chromium with a fresh, empty profile (``--user-data-dir``: Playwright's persistent context)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[ui]'")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=VIEWPORT,
            device_scale_factor=1,
        )
        try:
            yield context
        finally:
            context.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.ui_failed = report.failed
    return report


@pytest.fixture
def page(request, browser_context, tmp_path_factory):
    """A fresh page (tab); when the test fails, a screenshot of it is kept and its path printed."""
    page = browser_context.new_page()
    page.console_messages = []  # what the front end logged: shown when a test fails
    page.on("console", lambda m: page.console_messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: page.console_messages.append(f"pageerror: {e}"))
    try:
        yield page
    finally:
        if getattr(request.node, "ui_failed", False):
            shot = tmp_path_factory.getbasetemp() / f"{request.node.name}-failed.png"
            with contextlib.suppress(Exception):
                page.screenshot(path=shot, full_page=True)
                print(
                    f"\nscreenshot of the failed page: {shot}\nbrowser console:\n"
                    + "\n".join(page.console_messages[-30:])
                )
        page.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
