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
``control_result`` payload's ``result``. :meth:`ControlClient.infer` keeps its link
open for one answer: it sends an ``inference_request`` and yields every
``inference_response`` until the last (``done``); closing it early sends an
``inference_cancel``.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Sequence

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake, InvalidURI

from worker import pki, protocol
from worker.link import Credentials, HandshakeFailed, Link, LinkClosed, open_link

CONTROL_NETWORK = "control"
CONTROL_CLIENT_NODE = "control-client"
DEFAULT_CONTROL_PORT = 7700
CONTROL_DIR = "control"
#: Seconds :meth:`ControlClient.infer` waits for the next message of an answer (a prefill of
#: a long prompt on slow workers comes first) before it gives up on the network.
INFER_IDLE_TIMEOUT_S = 120.0
#: Seconds allowed to tell the daemon that an answer is no longer wanted.
CANCEL_TIMEOUT_S = 5.0
#: Characters a conversation key keeps in a session id (the rest are removed).
_NOT_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


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


def session_id_for(network_id: str, key: str) -> str:
    """The inference session id of conversation ``key`` on network ``network_id``:
    ``"<network_id>.<key>"``, with the characters of ``key`` outside ``[A-Za-z0-9_-]``
    removed and the key cut so that the whole id has at most ``protocol.MAX_ID_CHARS``
    (64) characters. The daemon finds the network by splitting at the first ``"."``.
    A key with no usable character is replaced by the hex SHA-256 of its UTF-8 bytes,
    so every conversation still gets a stable id of its own.

    E.g. ``session_id_for("net-1a2b3c4d", "0b7e4c1e-3f7a-4c55-9a39-2b1f8f9c6d10")`` →
    ``"net-1a2b3c4d.0b7e4c1e-3f7a-4c55-9a39-2b1f8f9c6d10"`` (49 characters).

    Raises:
        ValueError: ``network_id`` is not a protocol id, contains a ``"."`` (the daemon
            could not split it off), or leaves no room for a key.
    """
    if not protocol.ID_PATTERN.fullmatch(network_id or "") or "." in network_id:
        raise ValueError(f"network id {network_id!r} cannot name a session: it must be {protocol.ID_RULE}, without '.'")
    room = protocol.MAX_ID_CHARS - len(network_id) - 1
    if room < 1:
        raise ValueError(f"network id {network_id!r} is too long to leave room for a conversation key in a session id")
    clean = _NOT_KEY_CHARS.sub("", key) or hashlib.sha256(key.encode("utf-8")).hexdigest()
    return f"{network_id}.{clean[:room]}"


def _sampling_payload(sampling: Optional[dict]) -> Optional[dict]:
    """``sampling`` with every field of ``protocol.SAMPLING_FIELDS`` (missing ones null).
    Raises ValueError for a field the protocol does not define."""
    if sampling is None:
        return None
    unknown = set(sampling) - set(protocol.SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"sampling takes no field(s) {sorted(unknown)}; known: {sorted(protocol.SAMPLING_FIELDS)}")
    return {k: sampling.get(k) for k in protocol.SAMPLING_FIELDS}


class ControlClient:
    """Calls the control commands of the daemon whose data directory is ``data_dir``.

    ``timeout_s`` bounds one whole call (connect, opening, command) and the opening of
    :meth:`infer`; ``idle_timeout_s`` bounds each wait for the next message of an answer
    (seconds). Commands and their arguments: ``protocol.CONTROL_COMMANDS``; results:
    docs/PROTOCOL.md.
    """

    def __init__(self, data_dir: Path, timeout_s: float = 30.0, idle_timeout_s: float = INFER_IDLE_TIMEOUT_S):
        self.data_dir = Path(data_dir)
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
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

    async def _open(self) -> tuple[Link, str]:
        """A control link to the daemon, opened and authenticated, and ``"host:port"``.

        Raises DaemonUnavailable (no credentials, nothing listening, TLS or opening refused).
        """
        creds, endpoint = self._credentials()
        host, port = endpoint.get("host", "127.0.0.1"), endpoint.get("port", DEFAULT_CONTROL_PORT)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        where = f"{host}:{port}"
        ctx = pki.client_context(creds.cert, creds.key, creds.ca_cert)
        url = f"wss://[{host}]:{port}/" if ":" in host else f"wss://{host}:{port}/"
        try:
            ws = await connect(url, ssl=ctx, open_timeout=10, **protocol.WEBSOCKET_OPTIONS)
        except (ConnectionRefusedError, OSError) as e:
            if isinstance(e, ssl.SSLError):
                raise DaemonUnavailable(f"The TLS connection to the worker daemon at {where} failed ({e.reason}).") from None
            raise DaemonUnavailable(f"No worker daemon is running (nothing at {where}). {_start_hint(self.data_dir)}") from None
        except (InvalidHandshake, InvalidURI) as e:
            raise DaemonUnavailable(f"Something at {where} is not a worker daemon ({e}).") from None
        try:
            link = await open_link(ws, creds, pki.NonceCache(), expected_node_id=endpoint.get("node_id"),
                                   expected_role="admin")
        except HandshakeFailed as e:
            await ws.close()
            raise DaemonUnavailable(f"The worker daemon at {where} refused this client: {e}") from None
        except BaseException:
            await ws.close()
            raise
        return link, where

    async def _call(self, command: str, args: dict) -> dict:
        link, where = await self._open()
        try:
            request = await link.send_new("control", {"command": command, "args": args})
            while True:
                m = await link.recv()
                if m.request_id != request.request_id:
                    continue
                if m.message_type == "error":
                    raise ControlError(m.payload["code"], m.payload["message"])
                if m.message_type == "control_result":
                    return m.payload["result"]
        except LinkClosed:
            raise DaemonUnavailable(f"The worker daemon at {where} closed the connection before answering.") from None
        finally:
            await link.close()

    async def infer(
        self,
        network_id: str,
        conversation_key: str,
        input_ids: Sequence[int],
        max_length: int,
        sampling: Optional[dict] = None,
    ) -> AsyncIterator[dict]:
        """Generate on network ``network_id``: yields the payload of every ``inference_response``
        (``token_id``, ``text`` — the new piece of text —, ``done``, ``finish_reason``
        ``stop``/``length``/``cancelled``, and on the last one ``usage``: ``prompt_tokens``,
        ``cached_tokens``, ``completion_tokens``, ``prefill_ms``, ``decode_tokens_s``), the
        last one with ``done`` true.

        Args:
            network_id: the network whose workers run the model (this daemon must be its admin).
            conversation_key: names the session (see :func:`session_id_for`): the same key
                continues the same KV caches on the workers, so only new tokens are computed.
            input_ids: the whole prompt's token ids (1..``protocol.MAX_INPUT_IDS``).
            max_length: prompt plus generated tokens at most; more than ``len(input_ids)``.
            sampling: any of ``temperature``, ``top_p``, ``top_k``, ``seed``
                (``protocol.SAMPLING_FIELDS``); None: the daemon's defaults.

        Opening the link is bounded by ``timeout_s``; after that each message may take up to
        ``idle_timeout_s`` (there is no bound on the whole answer). Closing the
        generator before the last message (``aclose()``, e.g. the stop button) sends an
        ``inference_cancel`` for the session and closes the link.

        Raises:
            DaemonUnavailable: no daemon, the connection broke, or nothing came for
                ``idle_timeout_s`` seconds.
            ControlError: the daemon's ``error`` (e.g. ``conflict``: the network's blocks
                are not all loaded; a worker vanished mid-answer), its sentence in ``message``.
            ValueError: the request itself is invalid (a caller's bug), before anything is sent.
        """
        session_id = session_id_for(network_id, conversation_key)
        request = protocol.make_message("inference_request", {
            "input_ids": [int(i) for i in input_ids], "attention_mask": None, "max_length": int(max_length),
            "sampling": _sampling_payload(sampling),
        }, network_id=CONTROL_NETWORK, session_id=session_id)
        try:
            link, where = await asyncio.wait_for(self._open(), self.timeout_s)
        except asyncio.TimeoutError:
            raise DaemonUnavailable(
                f"The worker daemon did not answer within {self.timeout_s:g} s; it may be busy or stuck.") from None
        finished = False
        try:
            await link.send(request)
            while True:
                try:
                    m = await link.recv(timeout=self.idle_timeout_s)
                except asyncio.TimeoutError:
                    raise DaemonUnavailable(
                        f"The worker network sent nothing for {self.idle_timeout_s:g} s while answering; "
                        "a worker may be stuck or gone.") from None
                if m.request_id != request.request_id and m.session_id != session_id:
                    continue
                if m.message_type == "error":
                    finished = True
                    raise ControlError(m.payload["code"], m.payload["message"])
                if m.message_type != "inference_response":
                    continue
                finished = bool(m.payload["done"])
                yield m.payload
                if finished:
                    return
        except LinkClosed:
            raise DaemonUnavailable(
                f"The worker daemon at {where} closed the connection before the answer was complete.") from None
        finally:
            if not finished:  # stopped early (aclose, cancellation, idle timeout): the daemon may stop too
                with contextlib.suppress(LinkClosed, asyncio.TimeoutError, OSError):
                    cancel = protocol.make_message("inference_cancel", network_id=CONTROL_NETWORK, session_id=session_id)
                    await asyncio.wait_for(link.send(cancel), CANCEL_TIMEOUT_S)
            await link.close()

__all__ = ["CONTROL_NETWORK", "ControlClient", "ControlError", "ControlFiles", "DEFAULT_CONTROL_PORT",
           "DaemonUnavailable", "INFER_IDLE_TIMEOUT_S", "ensure_control_credentials", "session_id_for", "write_endpoint"]
