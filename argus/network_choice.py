"""Which worker network the chat server uses: ``/network use <id>``, kept server-wide.

The choice is one small JSON file, ``<ARGUS_DATA_DIR>/cluster.json``
(``{"network_id": "..."}``), written atomically (temporary file, fsync,
rename) with owner-only permissions, so every chat session, every server
process on this data directory and a restart all see the same network. The
network back-end reads it with :func:`current_network` (the file keeps its old name).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

log = logging.getLogger(__name__)

#: The file, inside ARGUS_DATA_DIR, holding the network in use.
CHOICE_FILE = "cluster.json"


class NetworkChoice:
    """The network the chat uses, read from and written to ``data_dir/cluster.json``.

    Args:
        data_dir: the chat server's data directory (``Settings.data_dir``).
    """

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / CHOICE_FILE

    def current_network(self) -> Optional[str]:
        """The network id chosen with ``/network use``, or None (never chosen, or
        the file is unreadable: logged, and treated as no choice)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return None
        value = data.get("network_id") if isinstance(data, dict) else None
        return value if isinstance(value, str) and value else None

    def use(self, network_id: Optional[str]) -> None:
        """Make ``network_id`` the network in use (None: no choice). Blocking (fsync).

        Raises:
            OSError: the data directory is not writable.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"network_id": network_id}).encode("utf-8")
        fd, tmp = tempfile.mkstemp(prefix=".network-choice-", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)  # mkstemp makes it 0600 already; keep it so explicitly
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise


def current_network(data_dir: Path) -> Optional[str]:
    """The network the chat uses (``/network use``) for the server whose data directory
    is ``data_dir``, or None when none was chosen."""
    return NetworkChoice(data_dir).current_network()


#: Seconds a deleted conversation waits for the daemon to drop its network session.
DROP_SESSION_TIMEOUT_S = 10.0


async def drop_conversation_session(services: Mapping[str, Any], conversation_id: str) -> bool:
    """Forget a deleted conversation's KV-cache session on the network the chat uses: the
    daemon's ``session_drop`` (every stage deletes the session from memory and disk). Both
    ``/delete`` and a delete from the sidebar (``ArgusDataLayer.delete_thread``) come here.

    ``services``: the chat server's services (``"network_choice"``: a :class:`NetworkChoice`,
    ``"daemon"``: a ``worker.control.ControlClient``). Best effort, never raises: with no
    network in use there is nothing to drop (False); a daemon that is down, slow
    (:data:`DROP_SESSION_TIMEOUT_S`) or refusing leaves the session on the workers until it
    is evicted or dropped with ``/network sessions``, and says so in the log (False).
    True when the daemon dropped it.
    """
    choice, daemon = services.get("network_choice"), services.get("daemon")
    network_id = choice.current_network() if choice is not None else None
    if daemon is None or not network_id:
        return False
    try:
        from worker.control import session_id_for

        session_id = session_id_for(network_id, conversation_id)
        result = await asyncio.wait_for(daemon.call("session_drop", network_id=network_id, session_id=session_id),
                                        DROP_SESSION_TIMEOUT_S)
    except Exception as e:  # DaemonUnavailable, ControlError, ValueError, TimeoutError: the conversation is gone anyway
        log.warning("the conversation %s is deleted, but its network session on %s could not be dropped now (%s: %s); "
                    "it stays on the workers until it is evicted or dropped with /network sessions",
                    conversation_id, network_id, type(e).__name__, e)
        return False
    log.info("dropped the network session of deleted conversation %s on %s (%s stages)", conversation_id, network_id,
             (result or {}).get("dropped") if isinstance(result, dict) else "?")
    return True
