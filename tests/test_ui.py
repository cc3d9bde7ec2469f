"""`orchestrate ui`: a real `mlflow server` on the smoke sweep's store, bound to 127.0.0.1; HTTP, the REST API and
a headless Chromium (Debian's chromium + chromium-driver, driven by Selenium) that finds the runs in the page.
The browser's screenshot is kept under out/ci-artifacts/ (ignored by git) for a person to look at."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.cli import main

from conftest import REPO
from sweep_runs import smoke_sweep  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(300)

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = REPO / "out" / "ci-artifacts"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1600,1000")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_line(log: Path, proc: subprocess.Popen, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text() if log.exists() else ""
        if text in content:
            return content
        if proc.poll() is not None:
            pytest.fail(f"orchestrate ui exited with {proc.returncode}:\n{content[-3000:]}")
        time.sleep(0.25)
    pytest.fail(f"orchestrate ui printed no {text!r} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def ui(smoke_sweep, tmp_path_factory):
    """`orchestrate ui` as a user starts it; stopped with SIGINT (Ctrl-C) by its pid, as a user stops it."""
    folder = tmp_path_factory.mktemp("ui")
    port = free_port()
    log = folder / "ui.log"
    command = [sys.executable, "-c", "import sys; from orchestrator.cli import main; sys.exit(main())",
               "ui", "--port", str(port), "--tracking-uri", smoke_sweep.uri]
    with open(log, "w") as out:  # a file, not a pipe: the server's access log must never block on a full pipe
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=folder,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        printed = wait_for_line(log, proc, "serving until Ctrl-C", timeout=180)
        yield {"port": port, "base": f"http://127.0.0.1:{port}", "printed": printed, "proc": proc}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert not listening(port), "the mlflow server outlived orchestrate ui"


def listening(port: int) -> list[str]:
    """Local addresses with a TCP socket listening on ``port`` (from /proc: no extra tool needed)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.append(address)
    return found


def test_prints_the_experiment_url_and_binds_loopback_only(ui, smoke_sweep):
    assert f"sweep smoke: {ui['base']}/#/experiments/{smoke_sweep.experiment_id}/runs\n" in ui["printed"]
    assert listening(ui["port"]) and set(listening(ui["port"])) == {"0100007F"}  # 127.0.0.1, little-endian hex


def test_http_200(ui):
    with urllib.request.urlopen(ui["base"] + "/", timeout=30) as response:
        assert response.status == 200
        assert b"<html" in response.read().lower()


def test_rest_api_lists_the_sweep_runs(ui, smoke_sweep):
    body = json.dumps({"experiment_ids": [smoke_sweep.experiment_id], "filter": "tags.kind = 'trial'",
                       "max_results": 100}).encode()
    request = urllib.request.Request(ui["base"] + "/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        runs = json.load(response)["runs"]
    listed = {r["info"]["run_id"] for r in runs}
    assert set(smoke_sweep.finished) | {smoke_sweep.failed_run, smoke_sweep.early_stopped_run} == listed


def test_browser_finds_the_runs(ui, smoke_sweep, tmp_path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); .ci/run installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={tmp_path / 'profile'}",):
        options.add_argument(flag)
    client = MlflowClient(smoke_sweep.uri)
    names = [client.get_run(run_id).info.run_name for run_id in smoke_sweep.finished]
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)  # no Selenium Manager download
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        driver.get(f"{ui['base']}/#/experiments/{smoke_sweep.experiment_id}/runs")  # the URL ui printed
        try:
            WebDriverWait(driver, 90, poll_frequency=0.5).until(
                lambda d: all(name in d.find_element("tag name", "body").text for name in names))
        finally:
            driver.save_screenshot(str(ARTIFACTS / "mlflow-ui-experiment.png"))
        text = driver.find_element("tag name", "body").text
        assert all(name in text for name in names), names
    finally:
        driver.quit()
    assert (ARTIFACTS / "mlflow-ui-experiment.png").stat().st_size > 10_000


def test_port_in_use_is_a_one_line_error(smoke_sweep, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--port", str(port), "--tracking-uri", smoke_sweep.uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"port {port} on 127.0.0.1 is in use" in err


def test_a_host_that_does_not_resolve_is_named_not_called_a_port_in_use(smoke_sweep, capsys):
    assert main(["ui", "--host", "not a host", "--tracking-uri", smoke_sweep.uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--host 'not a host': not a known host or address" in err, err


def test_unknown_sweep_lists_the_sweeps(smoke_sweep, capsys):
    assert main(["ui", "--sweep", "nope", "--tracking-uri", smoke_sweep.uri]) == 2
    assert "no sweep 'nope'" in capsys.readouterr().err


def test_missing_store_is_an_error_and_creates_nothing(tmp_path, capsys):
    db = tmp_path / "typo.db"
    assert main(["ui", "--tracking-uri", f"sqlite:///{db}"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err and not db.exists()


def test_chromium_is_installed():
    """The browser test must not silently skip in CI: .ci/run installs Debian's chromium and chromium-driver."""
    if not os.environ.get("CI"):
        pytest.skip("outside CI the browser test skips itself when chromium is missing")
    assert shutil.which("chromium") and shutil.which("chromedriver")
