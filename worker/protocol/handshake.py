"""The opening of a connection: which message may come next, as a state machine (no I/O).

``Handshake`` checks only the order of the opening messages (``hello``,
``challenge``, ``challenge_response``, ``join_*``); verifying the signatures
they carry is ``worker.pki``'s job, and sending them is the link's.
"""
from __future__ import annotations

from worker.protocol.errors import UnexpectedMessage

_OPENING_TYPES = frozenset({"hello", "challenge", "challenge_response", "join_hello", "join_ca", "join_request", "join_pending",
                            "join_approved", "join_rejected"})
# state -> {(sent by initiator?, message_type): next state}
_HANDSHAKE: dict[str, dict[tuple[bool, str], str]] = {
    "start": {(True, "hello"): "hello", (True, "join_hello"): "join_hello", (True, "join_request"): "joining"},
    "join_hello": {(False, "join_ca"): "join_ca"},
    "join_ca": {(True, "join_request"): "joining"},
    "hello": {(False, "challenge"): "challenged"},
    "challenged": {(True, "challenge"): "challenged_both"},
    "challenged_both": {(True, "challenge_response"): "initiator_proved"},
    "initiator_proved": {(False, "challenge_response"): "authenticated"},
    "joining": {(False, "join_pending"): "joining", (False, "join_approved"): "joined",
                (False, "join_rejected"): "rejected"},
}


class Handshake:
    """The opening of one connection, as seen by either end (no I/O).

    Members prove their keys both ways (the challenge of worker/pki.py):
    initiator ``hello`` → responder ``challenge`` (its nonce) → initiator
    ``challenge`` (its nonce) → initiator ``challenge_response`` (signature over
    the responder's nonce) → responder ``challenge_response`` (signature over the
    initiator's nonce) → "authenticated". Each side verifies the other's
    signature (``pki.verify_challenge``) before going on; this class only checks
    the order. Joiners: initiator ``join_hello`` → responder ``join_ca`` (the
    joiner checks the CA against its token before going on) → initiator
    ``join_request`` (a joiner may also start with it) → responder
    ``join_pending``* → ``join_approved`` ("joined") or ``join_rejected``
    ("rejected"); nothing follows. ``error`` is allowed in any state and changes
    nothing. Call ``sent``/``received`` for every message; any other order
    raises UnexpectedMessage.
    """

    def __init__(self, initiator: bool):
        self.initiator = initiator
        self.state = "start"

    @property
    def authenticated(self) -> bool:
        return self.state == "authenticated"

    def sent(self, message_type: str) -> None:
        self._advance(self.initiator, message_type)

    def received(self, message_type: str) -> None:
        self._advance(not self.initiator, message_type)

    def _advance(self, by_initiator: bool, message_type: str) -> None:
        if message_type == "error":
            return
        if self.state == "authenticated" and message_type not in _OPENING_TYPES:
            return
        nxt = _HANDSHAKE.get(self.state, {}).get((by_initiator, message_type))
        if nxt is None:
            who = "initiator" if by_initiator else "responder"
            raise UnexpectedMessage(f"{message_type} from the {who} is not allowed in handshake state {self.state}")
        self.state = nxt


__all__ = ["Handshake"]
