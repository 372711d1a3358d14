"""Issue 13 finding 6 (uploads without a quota) and issue 12 point 4 (a refused upload shown as a
broken image), against a real ``chainlit run app.py`` on 127.0.0.1, as the browser does it:
``POST /project/file?session_id=…`` with the session cookie, then ``client_message`` with the
file references over socket.io.

* Past the per-session cap the upload is refused (429, the sentence as ``detail``, what
  Chainlit's upload box shows) before its body is read, and nothing lands on disk; the first
  files are kept and reach the message. Another chat of the same user may upload, up to the
  per-user cap.
* A text file named ``.png`` is taken out of the user's bubble (``remove_element``) and off
  the disk.
* When the session ends (the socket disconnects and does not come back), its directory
  ``<app root>/.files/<session id>/`` is removed.
"""
from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.support.live_server import Chat, history_env, png, serve, sign_in, sign_up

pytestmark = pytest.mark.e2e

MB = 1024 * 1024
SESSION_SENTENCE = ("This chat has already received 3 files, the most one chat may upload; "
                    "start a new chat to upload more.")
USER_SENTENCE_START = "You have uploaded 5 files in the last 24 hours, the most allowed; you can upload again in "


async def _upload(chat: Chat, name: str, data: bytes, mime: str = "image/png") -> httpx.Response:
    async with httpx.AsyncClient(base_url=chat.srv.base, timeout=60) as http:
        return await http.post(
            "/project/file", params={"session_id": chat.session_id}, files={"file": (name, data, mime)},
            headers={"Cookie": f"access_token={chat.token}"},
        )


def _wait_gone(path: Path, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return not path.exists()


async def test_upload_quotas_refused_files_and_session_end_on_a_running_server(tmp_path):
    env = history_env(tmp_path, ARGUS_UPLOAD_SESSION_FILES="3", ARGUS_UPLOAD_USER_FILES="5", ARGUS_UPLOAD_KEEP_S="1")
    files_root = Path(env["CHAINLIT_APP_ROOT"]) / ".files"
    with serve(tmp_path, env) as srv:
        sign_up(srv, "quota@example.com", "Quota")
        token = sign_in(srv, "quota@example.com")

        # ---- one chat: three files, then the cap ----------------------------------------------
        chat = Chat(srv, token)
        await chat.connect()
        session_dir = files_root / chat.session_id
        accepted = []
        for i in range(3):
            r = await _upload(chat, f"p{i}.png", png((i, 100, 200)) + b"\0" * MB)  # ~1 MiB each
            assert r.status_code == 200, r.text
            accepted.append(r.json())
        r = await _upload(chat, "p3.png", png() + b"\0" * MB)
        assert r.status_code == 429
        assert r.json() == {"detail": SESSION_SENTENCE}
        assert len(list(session_dir.iterdir())) == 3  # nothing landed beyond the cap
        # the legitimate files reach the message (an image without text: stored, nothing to answer)
        events, _ = await chat.turn("", files=accepted)
        assert not [d for ev, d in events if ev == "remove_element"]
        assert len(list(session_dir.iterdir())) == 3
        # the session ends: its directory goes (ARGUS_UPLOAD_KEEP_S=1)
        await chat.sio.disconnect()
        assert _wait_gone(session_dir), list(session_dir.iterdir())

        # ---- another chat of the same user: a fake image, then the per-user cap ------------------
        async with Chat(srv, token) as other:
            other_dir = files_root / other.session_id
            fake = await _upload(other, "notes.png", b"this is not an image at all\n" * 40)
            assert fake.status_code == 200, fake.text  # Chainlit stores what the browser labels image/png
            fake_id = fake.json()["id"]
            events, _ = await other.turn("", files=[fake.json()])
            assert {"id": fake_id} in [d for ev, d in events if ev == "remove_element"]  # no broken image
            notes = [d["output"] for ev, d in events if ev == "new_message" and d.get("type") == "assistant_message"]
            assert "notes.png is not an image I can read." in notes
            assert not list(other_dir.glob(f"{fake_id}*"))  # off the disk
            r = await _upload(other, "q.png", png())
            assert r.status_code == 200, r.text  # the user's fifth file
            r = await _upload(other, "r.png", png())
            assert r.status_code == 429
            assert r.json()["detail"].startswith(USER_SENTENCE_START)
            assert 0 < int(r.headers["retry-after"]) <= 24 * 3600

        # ---- the stored conversation holds the three accepted images ---------------------------
        store = srv_store(srv)
        try:
            uid = store.get_user_by_email("quota@example.com").id
            convs = store.list_conversations(uid).items
            stored = [m for c in convs for m in store.list_messages(c.id, uid).items if m.role == "user"]
            assert sorted(len(m.attachment_ids) for m in stored) == [3]
        finally:
            store.close()
        assert srv.proc.poll() is None
        assert "Traceback" not in srv.log(), srv.log()


def srv_store(srv):
    """The server's SQLite store, opened read-write beside it."""
    from argus.store import SQLiteStore

    return SQLiteStore(srv.data_dir)
