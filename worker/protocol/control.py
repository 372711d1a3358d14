"""The control endpoint's commands: name → argument schema (the chat server → its local daemon).

A ``control`` message carries ``{"command": name, "args": {...}}``;
``validate_control`` is its cross-field check (run by ``messages.validate_payload``).
The client (``worker.control.ControlClient``) fills every key from this table and
the daemon runs the command; this module only says what a well-formed one is.
"""
from __future__ import annotations

from worker.protocol.errors import InvalidPayload
from worker.protocol.schema import Bool, Field, Id, Int, Num, Str, check_schema, safe_repr

# The control endpoint's commands (the chat server → its local daemon): name → args
# schema. The client sends every key (null where the caller gave none); results are
# free-form JSON objects described in docs/PROTOCOL.md.
_NET = Id()
CONTROL_COMMANDS: dict[str, dict[str, Field]] = {
    "network_create": {"name": Str(max_len=64), "auto_approve": Bool(nullable=True),
                       "port": Int(hi=65535, nullable=True)},
    "network_list": {},
    "network_discover": {"timeout_ms": Int(lo=1, hi=30_000, nullable=True)},
    "network_join": {"token": Str(max_len=2048)},
    "network_leave": {"network_id": _NET},
    "network_status": {"network_id": _NET},
    "network_set": {"network_id": _NET, "auto_approve": Bool(nullable=True)},
    "token_issue": {"network_id": _NET, "ttl_s": Int(lo=1, hi=7 * 86400, nullable=True)},
    "workers_list": {"network_id": _NET},
    "worker_approve": {"network_id": _NET, "node_id": Id()},
    "worker_reject": {"network_id": _NET, "node_id": Id()},
    "worker_allocate": {"network_id": _NET, "node_id": Id(), "cpu_share": Num(lo=0.0, hi=1.0, nullable=True),
                        "ram_bytes": Int(nullable=True), "disk_bytes": Int(nullable=True)},
    "worker_remove": {"network_id": _NET, "node_id": Id()},
    "events": {"network_id": Id(nullable=True), "limit": Int(lo=1, hi=1000, nullable=True)},
    # issue 6: placement, block distribution, sessions (admin only)
    "placement_plan": {"network_id": _NET},
    "placement_apply": {"network_id": _NET},
    "distribution_status": {"network_id": _NET},
    "sessions_list": {"network_id": _NET},
    "session_drop": {"network_id": _NET, "session_id": Id()},
}


def validate_control(p: dict) -> None:
    """Raise InvalidPayload unless a ``control`` payload ``p`` names a defined command with valid args."""
    schema = CONTROL_COMMANDS.get(p["command"])
    if schema is None:
        raise InvalidPayload(f"control command {safe_repr(p['command'])} is not defined; "
                             f"known: {', '.join(sorted(CONTROL_COMMANDS))}")
    check_schema(schema, p["args"], where="args")


__all__ = ["CONTROL_COMMANDS", "validate_control"]
