"""``python -m worker``: run the worker daemon, or talk to a running one.

    python -m worker [serve] --data-dir D [--host H] [--control-port P] [--log-level L]
    python -m worker join <token> --data-dir D     # ask a network's admin to let this node in
    python -m worker networks --data-dir D         # the networks this node is in
    python -m worker workers <network> --data-dir D
    python -m worker token <network> --data-dir D  # (admin) a one-time join token

The daemon runs in the foreground (systemd or a container supervises it; see
deploy/argus-worker.service) and stops cleanly on SIGINT/SIGTERM. The client
subcommands use the control credentials in D (worker/control.py). Exit codes:
0 ok, 1 the daemon refused or failed, 2 usage, 3 no daemon.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from worker.control import DEFAULT_CONTROL_PORT, ControlClient, ControlError, DaemonUnavailable
from worker.discovery import DEFAULT_DISCOVERY_PORT, parse_targets

DEFAULT_DATA_DIR = os.environ.get("ARGUS_WORKER_DATA_DIR") or str(Path("data") / "worker")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m worker", description="Jarvis Argus worker daemon")
    p.add_argument("command", nargs="?", default="serve",
                   choices=("serve", "join", "networks", "workers", "token", "status", "events", "plan", "rebalance",
                            "blocks", "sessions", "download"))
    p.add_argument("argument", nargs="?",
                   help="the token (join), network id (workers, token, status, plan, rebalance, blocks, sessions) "
                        "or manifest URL/path (download)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"default: {DEFAULT_DATA_DIR}")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the network servers listen on; 0.0.0.0 for a LAN (default 127.0.0.1)")
    p.add_argument("--control-port", type=int, default=DEFAULT_CONTROL_PORT,
                   help=f"the local control endpoint's port on 127.0.0.1 (default {DEFAULT_CONTROL_PORT}; 0: any)")
    p.add_argument("--advertise-host", default=None, help="the address other nodes reach this one at")
    p.add_argument("--discovery-port", type=int, default=DEFAULT_DISCOVERY_PORT,
                   help=f"UDP discovery port (default {DEFAULT_DISCOVERY_PORT}; -1: no responder)")
    p.add_argument("--discovery-target", default=None,
                   help="where /network discover asks, host:port[,host:port…] (default the LAN broadcast address)")
    p.add_argument("--heartbeat-s", type=float, default=10.0, help="seconds between heartbeats (default 10)")
    p.add_argument("--model", default=os.environ.get("ARGUS_MODEL_PATH") or None,
                   help="GGUF model a new network records (default: the packaged SmolLM2)")
    p.add_argument("--measure-speed", action="store_true",
                   help="measure this node's decode speed once (a short engine benchmark) and report it")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


async def _serve(args: argparse.Namespace) -> int:
    from worker.daemon import Daemon

    daemon = Daemon(
        Path(args.data_dir), host=args.host, control_port=args.control_port, advertise_host=args.advertise_host,
        discovery_port=None if args.discovery_port < 0 else args.discovery_port,
        discovery_targets=parse_targets(args.discovery_target) if args.discovery_target else None,
        heartbeat_s=args.heartbeat_s, model_path=args.model, measure_speed=args.measure_speed,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, daemon.stop_event.set)
    try:
        await daemon.start()
    except OSError as e:
        print(f"worker: cannot start: {e}", file=sys.stderr)
        await daemon.stop()
        return 1
    print(f"worker {daemon.node_id}: control on 127.0.0.1:{daemon.control_port}, "
          f"{len(daemon.networks)} network(s)", flush=True)
    try:
        await daemon.stop_event.wait()
    finally:
        await daemon.stop()
    return 0


def _download(args: argparse.Namespace) -> int:
    """``download <manifest>``: fetch a model (manifest.json: files, sizes, SHA-256) into
    ``<data-dir>/models`` with resume and verification; print the paths (use one as --model)."""
    from worker.downloader import DownloadError, download

    if not args.argument:
        print("worker download: give the manifest URL or path", file=sys.stderr)
        return 2
    try:
        paths = download(args.argument, Path(args.data_dir) / "models")
    except (DownloadError, OSError) as e:
        print(f"download failed: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


async def _client(args: argparse.Namespace) -> int:
    client = ControlClient(Path(args.data_dir))
    need_arg = {"join": "token", "workers": "network id", "token": "network id", "status": "network id",
                "plan": "network id", "rebalance": "network id", "blocks": "network id", "sessions": "network id"}
    if args.command in need_arg and not args.argument:
        print(f"worker {args.command}: give the {need_arg[args.command]}", file=sys.stderr)
        return 2
    calls = {
        "join": lambda: client.call("network_join", token=args.argument),
        "networks": lambda: client.call("network_list"),
        "workers": lambda: client.call("workers_list", network_id=args.argument),
        "token": lambda: client.call("token_issue", network_id=args.argument),
        "status": lambda: client.call("network_status", network_id=args.argument),
        "events": lambda: client.call("events", network_id=args.argument),
        "plan": lambda: client.call("placement_plan", network_id=args.argument),
        "rebalance": lambda: client.call("placement_apply", network_id=args.argument),
        "blocks": lambda: client.call("distribution_status", network_id=args.argument),
        "sessions": lambda: client.call("sessions_list", network_id=args.argument),
    }
    try:
        result = await calls[args.command]()
    except DaemonUnavailable as e:
        print(str(e), file=sys.stderr)
        return 3
    except ControlError as e:
        print(f"refused: {e.message}", file=sys.stderr)
        return 1
    if args.command == "join":
        print(result["message"])
    print(json.dumps(result, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)
    os.umask(0o077)
    if args.command == "download":
        return _download(args)
    runner = _serve if args.command == "serve" else _client
    try:
        return asyncio.run(runner(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
