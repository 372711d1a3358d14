"""Byte-level BPE tokenizer and chat template of a GGUF model.

Sources of the format:

* GGUF spec (ggml ``docs/gguf.md``): the ``tokenizer.ggml.*`` keys -- ``model``
  (only ``"gpt2"``, i.e. byte-level BPE, is supported), ``pre``, ``tokens``,
  ``token_type`` (1 normal, 3 control, 4 user-defined), ``merges`` (``"a b"``
  strings, in priority order), ``bos/eos_token_id`` -- and ``tokenizer.chat_template``.
* GPT-2 byte-level BPE: every byte maps to one printable character (``Ġ`` is
  the space byte), so tokens are strings over a 256-character alphabet.
* llama.cpp's ``"smollm"`` pre-tokenizer: each ``\\p{N}`` character is split off
  alone, then the GPT-2 regex ``'s|'t|...| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``.

The BPE itself is HuggingFace ``tokenizers`` (pre-tokenizer
``Sequence[Digits(individual_digits), ByteLevel(use_regex)]``, ByteLevel
decoder); ids match llama.cpp's on the reference cases.
"""
from __future__ import annotations

import codecs
import re
import secrets
from typing import Any, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

# llama.cpp pre-tokenizer names that mean "each \p{N} alone, then the GPT-2 regex".
_DIGITS_THEN_GPT2 = frozenset({"smollm", "starcoder", "refact", "codeshell"})
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
_STOP_TEXTS = ("<|im_end|>", "<|endoftext|>")


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: printable bytes are themselves, the others U+0100 + n."""
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table = {chr(b): b for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in keep):
        table[chr(0x100 + n)] = b
    return table


_BYTE_DECODER = _gpt2_byte_decoder()


class TokenizerError(ValueError):
    """The GGUF's tokenizer is unsupported or its metadata is malformed (the message says which key)."""


def _field(reader: Any, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise TokenizerError(f"GGUF has no {key!r} metadata")
        return default
    try:
        return field.contents()
    except Exception as e:  # gguf raises assorted errors on odd field types
        raise TokenizerError(f"GGUF metadata {key!r} is unreadable: {e}") from e


class Tokenizer:
    """Encode/decode text for a GGUF model with a GPT-2 byte-level BPE vocabulary.

    Build it with :meth:`from_gguf`. Attributes: ``vocab_size``; ``bos_id``
    (None when the GGUF has none); ``eos_id``; ``special_ids`` (control tokens,
    token_type 3); ``stop_ids`` (ids that end generation: eos plus
    ``<|im_end|>``/``<|endoftext|>`` when in the vocabulary). Thread-safe for reads.
    """

    def __init__(self, tokens: Sequence[str], token_types: Sequence[int], merges: Sequence[str],
                 eos_id: int, bos_id: int | None = None, chat_template: str | None = None):
        """Build from GGUF-style lists; raises TokenizerError when they are inconsistent."""
        if len(tokens) != len(token_types):
            raise TokenizerError(f"{len(tokens)} tokens but {len(token_types)} token types")
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise TokenizerError("tokenizer.ggml.tokens has duplicate entries")
        pairs = []
        for m in merges:
            parts = m.split(" ")
            if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab or "".join(parts) not in vocab:
                raise TokenizerError(f"tokenizer.ggml.merges has a malformed merge {m!r}")
            pairs.append((parts[0], parts[1]))
        for name, i in (("eos", eos_id), ("bos", bos_id)):
            if i is not None and not (isinstance(i, int) and 0 <= i < len(tokens)):
                raise TokenizerError(f"{name} token id {i} is outside the vocabulary of {len(tokens)}")
        self._tokens, self._types = list(tokens), [int(t) for t in token_types]
        self.vocab_size, self.bos_id, self.eos_id = len(tokens), bos_id, eos_id
        self.special_ids = frozenset(i for i, t in enumerate(self._types) if t == _CONTROL)
        self.stop_ids = frozenset([eos_id] + [vocab[t] for t in _STOP_TEXTS if t in vocab])
        self._special_by_text = {tokens[i]: i for i in self.special_ids}
        # Leftmost, then longest, like the added-vocabulary matcher of `tokenizers` and llama.cpp.
        alternatives = sorted(self._special_by_text, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None
        user_defined = [tokens[i] for i, t in enumerate(self._types) if t == _USER_DEFINED]
        try:
            self._hf = self._build_hf(vocab, pairs, user_defined, list(self._special_by_text))
            self._hf_plain = self._build_hf(vocab, pairs, user_defined, [])
        except Exception as e:
            raise TokenizerError(f"tokenizers rejected the vocabulary/merges: {e}") from e
        self._template = None
        if chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
            env.globals["raise_exception"] = _raise_template_error
            try:
                self._template = env.from_string(chat_template)
            except jinja2.TemplateError as e:
                raise TokenizerError(f"tokenizer.chat_template does not compile: {e}") from e

    @staticmethod
    def _build_hf(vocab: dict, pairs: list, user_defined: list, specials: list) -> _HFTokenizer:
        hf = _HFTokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        hf.decoder = decoders.ByteLevel()
        hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        return hf

    @classmethod
    def from_gguf(cls, reader: Any) -> "Tokenizer":
        """Build from an open ``gguf.GGUFReader`` (GGUF spec ``tokenizer.ggml.*`` keys).

        Raises TokenizerError if ``tokenizer.ggml.model`` is not ``"gpt2"``, the
        pre-tokenizer is not one of llama.cpp's digits-then-GPT-2 family (``smollm``,
        ``starcoder``, ...), or a required key is missing or malformed.
        """
        model = _field(reader, "tokenizer.ggml.model")
        if model != "gpt2":
            raise TokenizerError(f"unsupported tokenizer.ggml.model {model!r}: only 'gpt2' (byte-level BPE) is supported")
        pre = _field(reader, "tokenizer.ggml.pre", "smollm")
        if pre not in _DIGITS_THEN_GPT2:
            raise TokenizerError(f"unsupported tokenizer.ggml.pre {pre!r}: supported are {sorted(_DIGITS_THEN_GPT2)}")
        return cls(_field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type"),
                   _field(reader, "tokenizer.ggml.merges"), eos_id=_field(reader, "tokenizer.ggml.eos_token_id"),
                   bos_id=_field(reader, "tokenizer.ggml.bos_token_id", None),
                   chat_template=_field(reader, "tokenizer.chat_template", None))

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of ``text``; never adds BOS. With ``allow_special=False`` control-token
        text such as ``<|im_end|>`` is tokenized as plain text (use for untrusted content).
        Bytes with no token (SmolLM2 lacks e.g. 0x04, 0x1d, 0xc0) are dropped, as llama.cpp does."""
        hf = self._hf if allow_special else self._hf_plain
        return hf.encode(text, add_special_tokens=False).ids

    def _check_id(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {self.vocab_size}")
        return int(token_id)

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ``ids`` (invalid UTF-8 becomes U+FFFD); control tokens dropped if ``skip_special``.
        Raises ValueError for an id outside the vocabulary."""
        return self._hf.decode([self._check_id(i) for i in ids], skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token: GPT-2 byte-level characters mapped back to bytes; for
        control/user-defined tokens, their UTF-8 text. Raises ValueError for a bad id."""
        text = self._tokens[self._check_id(token_id)]
        if self._types[token_id] != _NORMAL or not all(c in _BYTE_DECODER for c in text):
            return text.encode("utf-8")
        return bytes(_BYTE_DECODER[c] for c in text)

    def stream_decoder(self, skip_special: bool = True) -> "StreamDecoder":
        """A fresh :class:`StreamDecoder` for one generated sequence."""
        return StreamDecoder(self, skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the GGUF's own ``tokenizer.chat_template`` (Jinja, sandboxed, trim/lstrip
        blocks as in HF transformers) with ``messages``, ``add_generation_prompt``,
        ``bos_token``, ``eos_token``. Raises TokenizerError if the GGUF has no template,
        ValueError if the template fails on these messages."""
        if self._template is None:
            raise TokenizerError("the GGUF has no tokenizer.chat_template")
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token="" if self.bos_id is None else self._tokens[self.bos_id],
                eos_token=self._tokens[self.eos_id])
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed on these messages: {e}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the chat-templated prompt. Control tokens come only from the template:
        control-token text inside a message's ``content`` is tokenized as plain text.
        Equals ``encode(apply_chat_template(...))`` when no message contains such text.
        Raises ValueError if control-token text is in another field (e.g. ``role``) or the
        template transforms contents so they cannot be located."""
        if not any(self._has_special(m) for m in messages):
            return self.encode(self.apply_chat_template(messages, add_generation_prompt))
        return self._encode_chat_masked(messages, add_generation_prompt)

    def _has_special(self, obj: Any) -> bool:
        if isinstance(obj, str):
            return self._special_re is not None and self._special_re.search(obj) is not None
        if isinstance(obj, dict):
            return any(self._has_special(v) for v in obj.values())
        return isinstance(obj, (list, tuple)) and any(self._has_special(v) for v in obj)

    def _encode_chat_masked(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        # Render with a sentinel per content, then split: control tokens are matched only in
        # the template's own text; each run of text between them (contents included) is
        # tokenized as one plain piece, exactly as encode() would with no specials in contents.
        tag = secrets.token_hex(8)
        masked = []
        for k, m in enumerate(messages):
            if any(key != "content" and self._has_special(v) for key, v in m.items()):
                raise ValueError(f"message {k} has control-token text outside 'content'")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"message {k} content must be a string to hold control-token text")
            masked.append({**m, "content": f"\ue000{tag}:{k}\ue001"})
        parts = re.split(f"\ue000{tag}:(\\d+)\ue001", self.apply_chat_template(masked, add_generation_prompt))
        pieces: list[str | int] = [""]
        for j, part in enumerate(parts):
            chunks = [messages[int(part)]["content"]] if j % 2 else self._special_re.split(part)
            for c, chunk in enumerate(chunks):
                if not j % 2 and c % 2:  # a control token of the template
                    pieces += [self._special_by_text[chunk], ""]
                else:
                    pieces[-1] += chunk
        rebuilt = "".join(p if isinstance(p, str) else self._tokens[p] for p in pieces)
        if rebuilt != self.apply_chat_template(messages, add_generation_prompt):
            raise ValueError("the chat template transforms message contents; cannot encode them safely")
        ids: list[int] = []
        for p in pieces:
            ids += self.encode(p, allow_special=False) if isinstance(p, str) else [p]
        return ids


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


class StreamDecoder:
    """Incremental detokenizer for generated ids: :meth:`push` one id at a time.

    Bytes of an incomplete UTF-8 character are held back until the character is
    complete, so no partial character is ever returned. Bytes that can never form a
    character (a stray continuation byte, a lead byte followed by a non-continuation,
    an over-long form) are dropped, never turned into U+FFFD: in a byte-level BPE
    they only come from a model sampling odd single-byte tokens, and a replacement
    character tells the reader nothing. A U+FFFD the model writes as a whole
    character (bytes EF BF BD) is text like any other and is kept.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tok, self._skip = tokenizer, skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")

    def push(self, token_id: int) -> str:
        """Text completed by ``token_id`` ('' while a character is incomplete or the token is a
        skipped control token; invalid bytes dropped). Raises ValueError for an id outside
        the vocabulary."""
        if self._skip and token_id in self._tok.special_ids:
            return ""
        return self._utf8.decode(self._tok.token_bytes(token_id))

    @property
    def pending(self) -> int:
        """Bytes held back now: the start of a character not complete yet (0 to 3)."""
        return len(self._utf8.getstate()[0])

    def flush(self) -> str:
        """End of stream: always "" — the bytes of a character left incomplete (an answer cut
        mid-character by the token limit or a stop) are dropped, not replaced; resets the
        decoder for reuse."""
        self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return ""
