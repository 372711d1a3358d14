"""The environment and start-up wait of a real ``chainlit run app.py`` started by a test."""
from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from pathlib import Path

import httpx

from tests.support.paths import REPO


def env_names() -> set[str]:
    """Every ARGUS_* variable the server's code reads (found in its sources, so new ones are covered),
    and the provider API-key variables (blank: no test server may call a real provider)."""
    from argus.config import API_KEY_VARS

    names = {"JWT_SECRET_KEY", *(v for pair in API_KEY_VARS.values() for v in pair)}  # no provider key leaks in
    for path in [REPO / "app.py", *(REPO / "argus").rglob("*.py"), *(REPO / "worker").rglob("*.py")]:
        names.update(re.findall(r"\bARGUS_[A-Z0-9_]+\b", path.read_text(encoding="utf-8", errors="replace")))
    return names


def server_env(data_dir: Path, **extra_env: str) -> dict[str, str]:
    """The server's environment: every ARGUS_* variable and JWT_SECRET_KEY set explicitly.

    An empty value means "the default" to the server, and it keeps a developer's
    ``.env`` out: python-dotenv never overrides a variable that is already set.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "CI"  # Chainlit's CLI reads CI=true as --ci
        and not k.startswith(("ARGUS_", "CHAINLIT_", "JWT_", "LITERAL_", "DATABASE_URL", "FORWARDED_"))
    }
    env.update({name: "" for name in env_names()})
    env.update(
        ARGUS_DATA_DIR=str(data_dir),
        ARGUS_MAX_NEW_TOKENS="24",
        ARGUS_MESSAGES_PER_MINUTE="3",
        ARGUS_LOGIN_ATTEMPTS="3",
        ARGUS_LOG_LEVEL="INFO",
        JWT_SECRET_KEY=secrets.token_urlsafe(36),  # 48 characters
        DATABASE_URL="",  # Chainlit's own data layer stays off whatever .env says (app.py registers ours)
        LITERAL_API_KEY="",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra_env)
    return env


def wait_until_up(base: str, proc: subprocess.Popen, log_path: Path, timeout: float = 120.0) -> None:
    """Wait until ``base`` answers 200 on ``/``; RuntimeError with the log's tail if the process exits or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}")
        try:
            if httpx.get(base + "/", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server did not answer within {timeout} s:\n{log_path.read_text(errors='replace')[-4000:]}")
