"""Real worker daemon processes for tests: ``python -m worker`` on loopback.

Each daemon gets its own data directory, a free control port and a free UDP
discovery port on 127.0.0.1 (never a broadcast address), and a short heartbeat.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from worker.control import ControlClient, DaemonUnavailable

from tests.support.paths import REPO
HEARTBEAT_S = 0.3


@dataclass
class DaemonProcess:
    """One running ``python -m worker`` and a control client for it."""

    name: str
    data_dir: Path
    proc: subprocess.Popen
    log_path: Path
    client: ControlClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = ControlClient(self.data_dir, timeout_s=30)

    @property
    def node_id(self) -> str:
        return json.loads((self.data_dir / "node.json").read_text())["node_id"]

    @property
    def discovery_port(self) -> int:
        return self.discovery

    async def call(self, command: str, **args):
        return await self.client.call(command, **args)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict]:
        path = self.data_dir / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(data_dir: Path, name: str, *, discovery_targets: Optional[str] = None,
                 discovery_port: Optional[int] = None, extra: tuple[str, ...] = ()) -> DaemonProcess:
    """Start a daemon and wait until its control endpoint answers (≤ 60 s)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"{name}.log"
    port = discovery_port or _free_udp_port()
    args = [sys.executable, "-m", "worker", "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1",
            "--control-port", "0", "--discovery-port", str(port), "--heartbeat-s", str(HEARTBEAT_S),
            "--log-level", "DEBUG"]
    # /network discover never leaves this machine in tests: without a target given, it asks its own port
    args += ["--discovery-target", discovery_targets or f"127.0.0.1:{port}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    endpoint = data_dir / "control" / "endpoint.json"
    if endpoint.exists():
        endpoint.unlink()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args + list(extra), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    d = DaemonProcess(name, data_dir, proc, log_path)
    d.discovery = port
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon {name} exited with {proc.returncode}:\n{d.log()[-3000:]}")
        if endpoint.exists():
            try:
                _run_blocking(d.call("network_list"))
                return d
            except DaemonUnavailable:
                pass
        time.sleep(0.1)
    d.stop()
    raise RuntimeError(f"daemon {name} did not answer within 60 s:\n{d.log()[-3000:]}")


def _run_blocking(coro):
    """Run ``coro`` to completion from sync code, even inside a running event loop (own thread)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1, what: str = "condition"):
    """Await ``predicate()`` (async, returns truthy) until true; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await predicate()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")
