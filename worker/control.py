"""The daemon's local control endpoint: its credentials and the client the chat server uses.

The control endpoint is a TLS 1.3 WebSocket server with mutual authentication,
like a network port, but under a CA of its own that only this daemon holds
(network id :data:`CONTROL_NETWORK`). At its first start the daemon creates,
in ``<data_dir>/control/`` (0700, files 0600):

* ``ca.pem`` / ``ca.key``: the control CA;
* ``server.pem`` / ``server.key``: the daemon's endpoint certificate (role admin);
* ``client.pem`` / ``client.key``: the client certificate (role ``control``)
  that the chat server and ``python -m worker join|status|…`` present;
* ``endpoint.json``: ``{"host", "port", "node_id"}`` where it listens now.

Whoever can read that directory controls the daemon, exactly like a Docker
socket: keep it owner-only. The chat server finds it through
``ARGUS_WORKER_DATA_DIR`` (default ``<ARGUS_DATA_DIR>/worker``).

:class:`ControlClient` opens a link per call (a control call is rare and the
opening costs a few ms), sends one ``control`` message and returns the
``control_result`` payload's ``result``.
"""
from __future__ import annotations

import asyncio
import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake, InvalidURI

from worker import pki, protocol
from worker.link import Credentials, HandshakeFailed, LinkClosed, open_link

CONTROL_NETWORK = "control"
CONTROL_CLIENT_NODE = "control-client"
DEFAULT_CONTROL_PORT = 7700
CONTROL_DIR = "control"


class DaemonUnavailable(Exception):
    """No daemon answers (no credentials yet, nothing listening, or it went away).

    ``str()`` is one sentence saying so and how to start one.
    """


class ControlError(Exception):
    """The daemon refused or failed a command. ``code``: the protocol error code;
    ``message`` (also ``str()``): its human sentence."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ControlFiles:
    """Paths of the control directory of a daemon's data dir."""

    root: Path

    @classmethod
    def of(cls, data_dir: Path) -> "ControlFiles":
        return cls(Path(data_dir) / CONTROL_DIR)

    def __getattr__(self, name: str) -> Path:  # ca_pem, ca_key, server_pem, ... endpoint
        stem, _, ext = name.rpartition("_")
        if ext in ("pem", "key") and stem in ("ca", "server", "client"):
            return self.root / f"{stem}.{ext}"
        if name == "endpoint":
            return self.root / "endpoint.json"
        raise AttributeError(name)


def ensure_control_credentials(data_dir: Path, node_id: str) -> ControlFiles:
    """Create the control CA, server and client credentials once (idempotent).

    Raises OSError when the directory cannot be written.
    """
    files = ControlFiles.of(data_dir)
    files.root.mkdir(parents=True, exist_ok=True)
    os.chmod(files.root, 0o700)
    if files.ca_pem.exists() and files.client_key.exists() and files.server_key.exists():
        return files
    ca_key, ca_cert = pki.create_network_ca(CONTROL_NETWORK, f"control of {node_id}")
    pki.save_private_key(files.ca_key, ca_key)
    pki.save_certificate(files.ca_pem, ca_cert)
    for stem, nid, role in (("server", node_id, "admin"), ("client", CONTROL_CLIENT_NODE, "control")):
        key = pki.new_node_key()
        cert = pki.sign_node_certificate(ca_key, ca_cert, pki.make_csr(key, nid, CONTROL_NETWORK), nid, role)
        pki.save_private_key(files.root / f"{stem}.key", key)
        pki.save_certificate(files.root / f"{stem}.pem", cert)
    return files


def write_endpoint(files: ControlFiles, host: str, port: int, node_id: str) -> None:
    pki.atomic_write(files.endpoint, json.dumps({"host": host, "port": port, "node_id": node_id}).encode(), mode=0o600)


def _start_hint(data_dir: Path) -> str:
    return f"Start one with: python -m worker --data-dir {data_dir}"


class ControlClient:
    """Calls the control commands of the daemon whose data directory is ``data_dir``.

    ``timeout_s`` bounds one whole call (connect, opening, command). Commands and
    their arguments: ``protocol.CONTROL_COMMANDS``; results: docs/PROTOCOL.md.
    """

    def __init__(self, data_dir: Path, timeout_s: float = 30.0):
        self.data_dir = Path(data_dir)
        self.timeout_s = timeout_s
        self.files = ControlFiles.of(self.data_dir)

    def _credentials(self) -> tuple[Credentials, dict]:
        try:
            endpoint = json.loads(self.files.endpoint.read_text(encoding="utf-8"))
            ca = pki.load_certificate(self.files.ca_pem)
            creds = Credentials(CONTROL_NETWORK, CONTROL_CLIENT_NODE, "control",
                                pki.load_certificate(self.files.client_pem), pki.load_private_key(self.files.client_key), ca)
        except FileNotFoundError:
            raise DaemonUnavailable(
                f"No worker daemon has run with data directory {self.data_dir}. {_start_hint(self.data_dir)}") from None
        except PermissionError:
            raise DaemonUnavailable(
                f"The worker daemon's control files in {self.files.root} are not readable by this user; "
                "run the chat server as the daemon's user.") from None
        except (OSError, ValueError, KeyError, pki.PKIError) as e:
            raise DaemonUnavailable(f"The worker daemon's control files in {self.files.root} are unusable ({e}).") from None
        return creds, endpoint

    async def call(self, command: str, **args: Any) -> dict:
        """Run ``command`` with ``args`` (missing optional ones are sent as null).

        Raises DaemonUnavailable (no daemon, connection refused or lost, timeout)
        and ControlError (the daemon's error reply: code and sentence).
        Raises ValueError for an unknown command or argument (a caller's bug).
        """
        schema = protocol.CONTROL_COMMANDS.get(command)
        if schema is None:
            raise ValueError(f"unknown control command {command!r}")
        unknown = set(args) - set(schema)
        if unknown:
            raise ValueError(f"{command} takes no argument(s) {sorted(unknown)}")
        full = {k: args.get(k) for k in schema}
        try:
            return await asyncio.wait_for(self._call(command, full), self.timeout_s)
        except asyncio.TimeoutError:
            raise DaemonUnavailable(
                f"The worker daemon did not answer within {self.timeout_s:g} s; it may be busy or stuck.") from None

    async def _call(self, command: str, args: dict) -> dict:
        creds, endpoint = self._credentials()
        host, port = endpoint.get("host", "127.0.0.1"), endpoint.get("port", DEFAULT_CONTROL_PORT)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        where = f"{host}:{port}"
        ctx = pki.client_context(creds.cert, creds.key, creds.ca_cert)
        url = f"wss://[{host}]:{port}/" if ":" in host else f"wss://{host}:{port}/"
        try:
            async with connect(url, ssl=ctx, open_timeout=10, **protocol.WEBSOCKET_OPTIONS) as ws:
                link = await open_link(ws, creds, pki.NonceCache(), expected_node_id=endpoint.get("node_id"),
                                       expected_role="admin")
                request = await link.send_new("control", {"command": command, "args": args})
                while True:
                    m = await link.recv()
                    if m.request_id != request.request_id:
                        continue
                    if m.message_type == "error":
                        raise ControlError(m.payload["code"], m.payload["message"])
                    if m.message_type == "control_result":
                        return m.payload["result"]
        except (ConnectionRefusedError, OSError) as e:
            if isinstance(e, ssl.SSLError):
                raise DaemonUnavailable(f"The TLS connection to the worker daemon at {where} failed ({e.reason}).") from None
            raise DaemonUnavailable(f"No worker daemon is running (nothing at {where}). {_start_hint(self.data_dir)}") from None
        except HandshakeFailed as e:
            raise DaemonUnavailable(f"The worker daemon at {where} refused this client: {e}") from None
        except LinkClosed:
            raise DaemonUnavailable(f"The worker daemon at {where} closed the connection before answering.") from None
        except (InvalidHandshake, InvalidURI) as e:
            raise DaemonUnavailable(f"Something at {where} is not a worker daemon ({e}).") from None


__all__ = ["CONTROL_NETWORK", "ControlClient", "ControlError", "ControlFiles", "DEFAULT_CONTROL_PORT",
           "DaemonUnavailable", "ensure_control_credentials", "write_endpoint"]
