"""Chat back-ends: one interface (:class:`ChatBackend`), three implementations.

* :class:`LocalBackend` (``local``): the local model, on a producer thread, one generation slot;
* :class:`RemoteBackend` (``remote``): the catalogue's providers through the API-key pool;
* :class:`NetworkBackend` (``network``): the worker network chosen with ``/network use``.
"""
from argus.chat.backends.base import BackendUnavailable, ChatBackend, Sink, Streamed, TurnStream
from argus.chat.backends.local import LOCAL_MODEL_FALLBACK_ID, LocalBackend, ModelHolder
from argus.chat.backends.network import NetworkBackend, is_network_model
from argus.chat.backends.remote import RemoteBackend

__all__ = [
    "BackendUnavailable", "ChatBackend", "LOCAL_MODEL_FALLBACK_ID", "LocalBackend", "ModelHolder", "NetworkBackend",
    "RemoteBackend", "Sink", "Streamed", "TurnStream", "is_network_model",
]
