"""Which model answers a session: the worker network, a catalogue model, or the local model.

While a network is chosen with ``/network use`` it is the default ("SmolLM2 on network
<name>"); otherwise ``ARGUS_DEFAULT_MODEL`` or the first catalogue model with a usable
API key, else the local model. A session may pick another with ``/model`` or the
composer's chat settings (Chainlit's ``ChatSettings`` select).
"""
from __future__ import annotations

from typing import Optional

import chainlit as cl

from argus.catalogue import ModelSpec
from argus.chat.backends import LOCAL_MODEL_FALLBACK_ID, ModelHolder, NetworkBackend, is_network_model
from argus.chat.session import current_session
from argus.commands import ModelInfo, SessionState
from argus.remote import Remote


class ModelChoice:
    """The models on offer and each session's choice among them."""

    def __init__(self, local: ModelHolder, remote: Remote, network: NetworkBackend):
        self.local, self.remote, self.network = local, remote, network

    async def offered(self) -> list[ModelInfo]:
        """The chat models users may pick, the default first: the worker network chosen with
        ``/network use`` (when one is), the local model, and the catalogue's chat models that
        have a usable key."""
        local = self.local.info()
        remote = [ModelInfo(id=m.id, name=f"{m.label} ({m.provider})") for m in await self.remote.chat_models()]
        default = await self.remote.default_model()
        models = [local, *remote]
        first = next((m for m in models if default is not None and m.id == default.id), local)
        network = await self.network.spec()
        head = [ModelInfo(id=network.id, name=network.label)] if network is not None else []
        return [*head, first, *(m for m in models if m is not first)]

    async def chosen(self, state: SessionState) -> Optional[ModelSpec]:
        """The catalogue chat model or worker network this session answers with, or None for
        the local model. A worker-network choice follows ``/network use`` (none chosen any
        more: the local model)."""
        if state.model_id:
            if is_network_model(state.model_id):
                return await self.network.spec()
            return self.remote.spec(state.model_id)  # a stale remote choice falls back when it is served
        return await self.network.spec() or await self.remote.default_model()

    def model_id_now(self, state: SessionState) -> str:
        """The id to record for this session's model, without waiting for the load."""
        if state.model_id is None or is_network_model(state.model_id):
            network_id = self.network.model_id_now()
            if network_id is not None:
                return network_id
        spec = self.remote.spec(state.model_id)
        if spec is not None:
            return spec.id
        model = self.local.loaded()
        return model.model_id if model is not None else (state.model_id or LOCAL_MODEL_FALLBACK_ID)

    async def pick(self, state: SessionState, wanted: object) -> None:
        """The user picked ``wanted`` in the chat settings: this chat uses it from now on
        (ignored unless it is one of :meth:`offered`)."""
        if not isinstance(wanted, str):
            return
        if any(m.id == wanted for m in await self.offered()):
            state.model_id = wanted

    async def send_settings(self, state: SessionState) -> None:
        """Show the model picker in the composer's chat settings (Chainlit's ``ChatSettings``)."""
        models = await self.offered()
        current = await self.chosen(state)
        current_id = current.id if current is not None else models[0].id
        if not any(m.id == current_id for m in models):
            current_id = models[0].id
        widget = cl.input_widget.Select(
            id="model", label="Model", items={m.name: m.id for m in models}, initial_value=current_id,
            description="The model that answers in this chat (also: /model <id>).",
        )
        session = current_session()
        if session is not None:
            session.chat_settings = {**(getattr(session, "chat_settings", None) or {}), "model": current_id}
        await cl.context.emitter.emit("chat_settings", [widget.to_dict()])
