"""docs/PROTOCOL.md is exact: its examples decode, its tables are the module's tables."""
from __future__ import annotations

import re

import numpy as np

from worker.protocol import (
    CONTROL_COMMANDS,
    ERROR_CODES,
    MESSAGE_TYPES,
    decode_message,
    encode_tensor,
)

from tests.support.paths import REPO

DOC = REPO / "docs" / "PROTOCOL.md"


def test_doc_hex_example_is_what_the_encoder_produces():
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- tensor-example -->\n```text\n(.*?)```", text, re.DOTALL).group(1)
    hex_bytes = bytes.fromhex("".join(line.split("  ")[0].split(":", 1)[1] for line in block.splitlines()))
    assert hex_bytes == encode_tensor(np.array([[1.0, -2.0, 0.5]], dtype=np.float32), "s1", 7, "r1")


def test_doc_json_examples_decode_and_cover_every_message_type():
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    types = {decode_message(b, max_skew=None).message_type for b in blocks}
    assert types == set(MESSAGE_TYPES)


def test_doc_lists_every_error_code_and_message_type():
    text = DOC.read_text(encoding="utf-8")
    for name in [*ERROR_CODES, *MESSAGE_TYPES]:
        assert f"`{name}`" in text, name


def test_doc_role_table_is_the_modules():
    """The ✔ table under "## Roles" says exactly who may send what."""
    section = DOC.read_text(encoding="utf-8").split("\n## Roles\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("| `")]
    header = next(ln for ln in section.splitlines() if ln.startswith("| message type"))
    roles = [c.strip().strip("`") for c in header.strip("|").split("|")[1:]]
    table = {}
    for ln in lines:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        table[cells[0].strip("`")] = {r for r, c in zip(roles, cells[1:]) if c == "✔"}
    assert table == {t: set(s.senders) for t, s in MESSAGE_TYPES.items()}


def test_doc_message_sections_state_the_modules_senders():
    """Every message type's section has a "Senders:" sentence naming exactly its senders."""
    text = DOC.read_text(encoding="utf-8")
    for t, spec in MESSAGE_TYPES.items():
        m = re.search(rf"\n#{{3,4}} `{t}`\n(.*?)```json", text, re.DOTALL)
        assert m, f"no section for {t}"
        senders = re.search(r"Senders: (.*?)\.(?: |\n|$)", m.group(1), re.DOTALL)
        assert senders, f"no Senders: sentence for {t}"
        named = set(re.findall(r"`(\w+)`", senders.group(1)))
        assert named == set(spec.senders), t


def test_doc_lists_every_control_command_and_leaves_the_routing_marker():
    text = DOC.read_text(encoding="utf-8")
    for name in CONTROL_COMMANDS:
        assert re.search(rf"^\| `{name}`", text, re.MULTILINE), name
    assert "## Inference, stages and blocks (issue 6)" in text and "<!-- routing-measurements -->" in text
