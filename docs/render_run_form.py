"""Render a deployment's *Custom run* form (the Prefect UI) to a PNG for the README.

Starts a throwaway ``prefect server`` on 127.0.0.1 (its own PREFECT_HOME in a temp dir),
sets it up and deploys ``deployments/prefect.yaml`` as a user would, screenshots the form
with headless Chromium (Debian: ``apt-get install chromium``) and stops the server::

    .venv/bin/python docs/render_run_form.py                    # -> docs/run_form.png
    .venv/bin/python docs/render_run_form.py --deployment gridistill-pooled/imagenet1k-weekly
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's prefect and python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(api_url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("prefect server exited; see its log")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"prefect server not healthy at {api_url} after {timeout} s")


def run(command: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    if done.returncode:
        raise RuntimeError(f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def deployment_id(api_url: str, name: str) -> str:
    with urllib.request.urlopen(f"{api_url}/deployments/name/{name}", timeout=10) as response:
        return json.load(response)["id"]


def screenshot(url: str, out: Path, window: str, chromium: str) -> None:
    with tempfile.TemporaryDirectory() as profile:  # no state from the user's browser
        subprocess.run([chromium, "--headless=new", "--no-sandbox", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={window}",
                        "--virtual-time-budget=20000", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=180)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deployment", default="gridistill-pooled/distill",
                        help="flow/deployment whose run form to render")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "run_form.png")
    parser.add_argument("--window", default="1400,6100",
                        help="browser window WIDTH,HEIGHT (the default fits the whole form)")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        parser.error("no chromium on PATH (Debian: apt-get install -y chromium)")

    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    with tempfile.TemporaryDirectory(prefix="run-form-") as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env |= {"PREFECT_API_URL": api_url, "PREFECT_HOME": f"{home}/client",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GRIDISTILL_SOURCE_DIR": str(REPO),
                "HF_HUB_OFFLINE": "1"}
        log_path = Path(home) / "server.log"
        with open(log_path, "w") as log:
            # The UI asks PREFECT_SERVER_API_PORT for its API: it must equal --port.
            server = subprocess.Popen(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                 str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                env=env | {"PREFECT_HOME": f"{home}/server", "PREFECT_SERVER_API_PORT": str(port)})
        try:
            wait_healthy(api_url, server)
            run([str(BIN / "python"), "-m", "gridistill.deployments.setup", "--gpu-slots", "1"],
                env)
            run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file",
                 "deployments/prefect.yaml"], env)
            url = (f"http://127.0.0.1:{port}/deployments/deployment/"
                   f"{deployment_id(api_url, args.deployment)}/run")
            screenshot(url, args.out.resolve(), args.window, chromium)
        except BaseException:
            print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
    print(f"{args.out}: the run form of {args.deployment} ({url})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
