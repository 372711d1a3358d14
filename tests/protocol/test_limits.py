"""Size limits and WebSocket options (worker/protocol/limits.py): frames over their kind's limit
are refused before parsing; one loopback check that the websockets library accepts the options.
"""
from __future__ import annotations

import numpy as np
import pytest

from worker.protocol import (
    MAX_FRAME_BYTES,
    MAX_JSON_FRAME_BYTES,
    MAX_TENSOR_FRAME_BYTES,
    SUBPROTOCOL,
    WEBSOCKET_OPTIONS,
    Message,
    ProtocolError,
    check_frame_size,
    decode_frame,
    decode_tensor,
    encode_message,
    encode_tensor,
    error_reply,
)

from tests.protocol.samples import (
    CERT,
    NET,
    NOW,
    code_of,
    decode,
)


@pytest.mark.parametrize("kind,limit", [("json", MAX_JSON_FRAME_BYTES), ("tensor", MAX_TENSOR_FRAME_BYTES)])
def test_check_frame_size_boundaries(kind, limit):
    check_frame_size(limit, kind)
    with pytest.raises(ProtocolError) as ei:
        check_frame_size(limit + 1, kind)
    assert ei.value.code == "frame_too_large"
    with pytest.raises(ValueError):
        check_frame_size(10, "xml")


def test_oversized_text_frame_is_refused_before_parsing():
    text = "[" * (MAX_JSON_FRAME_BYTES + 1)  # would be malformed if it were parsed
    assert code_of(decode, text) == "frame_too_large"
    assert code_of(decode, text.encode()) == "frame_too_large"
    assert code_of(decode, "é" * (MAX_JSON_FRAME_BYTES // 2 + 1)) == "frame_too_large"  # counted in UTF-8 bytes


def test_oversized_tensor_frame_is_refused_before_parsing():
    assert code_of(decode_tensor, bytes(MAX_TENSOR_FRAME_BYTES + 1)) == "frame_too_large"


def test_encoder_refuses_text_over_the_limit():
    m = Message("join_approved", "r", NET, None, NOW,
                {"certificate_pem": CERT, "ca_pem": CERT, "config": {"blob": "x" * MAX_JSON_FRAME_BYTES}})
    with pytest.raises(ValueError, match="limit"):
        encode_message(m)


def test_websocket_options_turn_compression_off_and_cap_frames():
    assert WEBSOCKET_OPTIONS["compression"] is None
    assert WEBSOCKET_OPTIONS["max_size"] == MAX_FRAME_BYTES == max(MAX_JSON_FRAME_BYTES, MAX_TENSOR_FRAME_BYTES)


async def test_websockets_accepts_the_options_on_loopback():
    """Real websockets on 127.0.0.1: options accepted, no extension negotiated, a tensor and an error travel."""
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    async def handler(ws):
        for _ in range(2):
            data = await ws.recv()
            try:
                got = decode_frame(data, now=NOW)
                await ws.send(encode_tensor(got.array * 2, got.session_id, got.step + 1, got.request_id))
            except ProtocolError as e:
                await ws.send(encode_message(error_reply(e, network_id=NET, timestamp=NOW)))

    async with serve(handler, "127.0.0.1", 0, **WEBSOCKET_OPTIONS) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", **WEBSOCKET_OPTIONS) as ws:
            assert ws.subprotocol == SUBPROTOCOL
            assert ws.protocol.extensions == []  # no permessage-deflate
            await ws.send(encode_tensor(np.ones((2, 4), np.float16), "s", 1, "r"))
            t = decode_frame(await ws.recv())
            assert (t.step, t.array.tolist()) == (2, [[2.0] * 4] * 2)
            await ws.send("not json")
            err = decode_frame(await ws.recv(), now=NOW)
            assert err.message_type == "error" and err.payload["code"] == "malformed_frame"
