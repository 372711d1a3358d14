"""Start the real ``chainlit run app.py`` (this repository's app.py) for a test.

* It runs from the repository directory, with every ``ARGUS_*`` variable,
  ``JWT_SECRET_KEY`` and ``CHAINLIT_URL`` set explicitly (an empty value
  blocks a developer's ``.env``: python-dotenv never overrides), ``CI``
  removed (Chainlit's CLI reads ``CI=true`` as its ``--ci`` flag), a private
  data directory and a model path that does not exist (no model is loaded;
  the server still runs and answers sign-in).
* ``CHAINLIT_APP_ROOT`` points at a private copy of ``.chainlit/``,
  ``public/`` and ``chainlit.md``: Chainlit keeps uploads in
  ``<app root>/.files`` and deletes that directory when it stops, which would
  pull the files from under any other server running from the repository.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import httpx
from tests.support.ports import free_port

from tests.support.paths import REPO
MISSING_MODEL = "/nonexistent/argus-test-model.gguf"


def server_env(data_dir: Path, app_root: Path, **overrides: str) -> dict[str, str]:
    """The subprocess environment: ours, minus CI and anything CHAINLIT_/ARGUS_/JWT_, plus explicit values."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "CI" and not k.startswith(("CHAINLIT_", "ARGUS_", "JWT_", "LITERAL_", "FORWARDED_"))
    }
    from tests.support.server_env import env_names

    env.update({name: "" for name in env_names()})  # every ARGUS_* blank (a developer's .env stays out); no API key
    env.update(
        ARGUS_DATA_DIR=str(data_dir),
        ARGUS_MODEL_PATH=MISSING_MODEL,
        JWT_SECRET_KEY="",  # generated into the data dir
        ARGUS_MESSAGES_PER_MINUTE="20",
        ARGUS_LOGIN_ATTEMPTS="7",
        ARGUS_LOGIN_WINDOW_S="300",
        ARGUS_MAX_UPLOAD_MB="10",
        ARGUS_MAX_NEW_TOKENS="16",
        ARGUS_TEMPERATURE="0.7",
        ARGUS_TOP_K="40",
        ARGUS_TOP_P="0.9",
        ARGUS_REPETITION_PENALTY="1.1",
        ARGUS_BLOCKS_PER_STAGE="",
        ARGUS_LOG_LEVEL="INFO",
        CHAINLIT_URL="",
        CHAINLIT_APP_ROOT=str(app_root),
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    return env


def make_app_root(root: Path, edit_config: Optional[Callable[[str], str]] = None) -> Path:
    """A private Chainlit app root holding copies of the repository's UI files."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / ".chainlit", root / ".chainlit", dirs_exist_ok=True)
    shutil.copytree(REPO / "public", root / "public", dirs_exist_ok=True)
    shutil.copy(REPO / "chainlit.md", root / "chainlit.md")
    if edit_config is not None:
        cfg = root / ".chainlit" / "config.toml"
        cfg.write_text(edit_config(cfg.read_text(encoding="utf-8")), encoding="utf-8")
    return root


def launch(tmp: Path, port: int, edit_config: Optional[Callable[[str], str]] = None, **env: str) -> tuple[subprocess.Popen, Path]:
    """Start the server process (not waiting for it); returns it and its log file (stdout + stderr)."""
    app_root = make_app_root(tmp / "app_root", edit_config)
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chainlit", "run", "app.py", "--headless", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=server_env(tmp / "data", app_root, **env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return proc, log_path


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class Server:
    base: str
    port: int
    proc: subprocess.Popen
    tmp: Path
    log_path: Path

    @property
    def data_dir(self) -> Path:
        return self.tmp / "data"

    @property
    def app_root(self) -> Path:
        return self.tmp / "app_root"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


@contextlib.contextmanager
def running_server(
    tmp: Path, edit_config: Optional[Callable[[str], str]] = None, timeout: float = 60.0, **env: str
) -> Iterator[Server]:
    """``chainlit run app.py`` on a free loopback port, up and answering ``/health``; stopped afterwards."""
    port = free_port()
    proc, log_path = launch(tmp, port, edit_config, **env)
    srv = Server(f"http://127.0.0.1:{port}", port, proc, tmp, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"chainlit exited with {proc.returncode}:\n{srv.log()}")
            try:
                if httpx.get(srv.base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"chainlit did not start within {timeout} s:\n{srv.log()}")
            time.sleep(0.2)
        yield srv
    finally:
        stop(proc)
