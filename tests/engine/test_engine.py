"""The NumPy engine against llama.cpp's exact-f32 reference, in one stage and in chained stages."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from tests.support.paths import REPO
from tests.support.reference import reference, reference_logits
from worker.engine import BlockRange, ModelLoadError, LocalModel, Pipeline, SamplingParams, Stage

CASES = ["france", "persian_greeting"]


def three_stages_by_hand(model: LocalModel) -> Pipeline:
    """Three stages of 10 blocks built from the single stage's weights (no second copy)."""
    whole = model.pipeline.stages[0]
    cfg, total, mid = whole.cfg, whole.block_range.total, whole.block_range.model_id
    ranges = BlockRange.split_even(mid, total, 10)
    stages = [
        Stage(
            r, cfg, whole.blocks[r.start : r.end],
            embedding=whole.embedding if r.is_first else None,
            output_norm=whole.output_norm if r.is_last else None,
            output=whole.output if r.is_last else None,
        )
        for r in ranges
    ]
    return Pipeline(stages)


def greedy_ids(pipeline: Pipeline, prompt_ids: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    logits = pipeline.forward("ref", np.array(prompt_ids), 0)[0]
    first = logits
    out, pos = [], len(prompt_ids)
    for _ in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        logits = pipeline.forward("ref", np.array([tok]), pos)[0]
        pos += 1
    pipeline.drop_session("ref")
    return first, out


@pytest.mark.parametrize("chain", ["one_stage", "three_stages"])
@pytest.mark.parametrize("case", CASES)
def test_logits_and_32_greedy_ids_match_llama_cpp(local_model, case, chain):
    ref = reference(case)
    pipeline = local_model.pipeline if chain == "one_stage" else three_stages_by_hand(local_model)
    logits, ids = greedy_ids(pipeline, ref["prompt_ids"], 32)
    assert np.abs(logits - reference_logits(case)).max() < 1e-3
    assert ids == ref["greedy_ids"]


@pytest.mark.parametrize("case", CASES)
def test_chat_template_and_tokenizer_give_reference_prompt_ids(local_model, case):
    ref = reference(case)
    user = ref["prompt_text"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    gen = local_model.chat([{"role": "user", "content": user}], SamplingParams.greedy(4))
    assert gen.prompt_ids == ref["prompt_ids"]


def test_chat_greedy_stops_at_end_of_turn_with_reference_text(local_model):
    ref = reference("france")
    gen = local_model.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams.greedy(64))
    text = "".join(gen)
    assert text == "The capital of France is Paris."
    assert gen.finish_reason == "stop"
    assert gen.generated_ids == ref["greedy_ids"][: ref["greedy_ids"].index(2)]


def test_persian_streams_whole_characters(local_model):
    ref = reference("persian_greeting")
    gen = local_model.generate(ref["prompt_ids"], SamplingParams.greedy(32))
    pieces = list(gen)
    assert gen.generated_ids == ref["greedy_ids"]
    assert "".join(pieces) == ref["greedy_text"]
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) < 32  # some characters span two tokens and were held back


def test_incremental_decode_equals_full_forward(local_model):
    ids = reference("france")["prompt_ids"]
    p = local_model.pipeline
    full = p.forward("full", np.array(ids), 0, all_logits=True)
    p.drop_session("full")
    p.forward("inc", np.array(ids[:20]), 0)
    step = [p.forward("inc", np.array([t]), 20 + i)[0] for i, t in enumerate(ids[20:])]
    p.drop_session("inc")
    np.testing.assert_allclose(np.stack(step), full[20:], atol=1e-4)


def test_rewinding_a_session_recomputes_from_that_position(local_model):
    ids = reference("france")["prompt_ids"]
    p = local_model.pipeline
    a = p.forward("rw", np.array(ids), 0)[0]
    p.forward("rw", np.array([5, 6, 7]), len(ids))  # go on, then rewind
    b = p.forward("rw", np.array(ids[-1:]), len(ids) - 1)[0]
    p.drop_session("rw")
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_stage_rejects_bad_inputs(local_model):
    s = local_model.pipeline.stages[0]
    with pytest.raises(ValueError, match="token ids"):
        s.forward("bad", np.array([49152]), 0)
    with pytest.raises(ValueError, match="int"):
        s.forward("bad", np.zeros((2, 576), np.float32), 0)
    with pytest.raises(ValueError, match="skips past"):
        s.forward("bad2", np.array([1, 2]), 5)


def test_pipeline_refuses_ranges_that_do_not_chain(local_model):
    whole = local_model.pipeline.stages[0]
    a = Stage(BlockRange("m", 0, 10, 30), whole.cfg, whole.blocks[:10], embedding=whole.embedding)
    c = Stage(BlockRange("m", 20, 30, 30), whole.cfg, whole.blocks[20:], output_norm=whole.output_norm, output=whole.output)
    with pytest.raises(ValueError, match="do not chain"):
        Pipeline([a, c])


def test_block_range_is_half_open_and_validated():
    r = BlockRange("m", 0, 10, 30)
    assert r.is_first and not r.is_last and len(r) == 10 and list(r)[-1] == 9
    assert [str(x) for x in BlockRange.split_even("m", 30, 12)] == ["m[0:12]/30", "m[12:24]/30", "m[24:30]/30"]
    with pytest.raises(ValueError):
        BlockRange("m", 5, 5, 30)
    with pytest.raises(ValueError):
        BlockRange("m", 0, 31, 30)


# sampling ------------------------------------------------------------------

def test_seeded_sampling_is_reproducible_and_differs_across_seeds(local_model):
    msgs = [{"role": "user", "content": "Tell me a story about a cat."}]
    run = lambda seed: local_model.chat(msgs, SamplingParams(temperature=1.0, seed=seed, max_tokens=12))  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    for g in (a, b, c):
        list(g)
    assert a.generated_ids == b.generated_ids
    assert a.generated_ids != c.generated_ids


def test_top_k_one_equals_greedy():
    from worker.engine import Sampler

    logits = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    s = Sampler(SamplingParams(temperature=1.5, top_k=1, top_p=1.0, repetition_penalty=1.0, seed=3))
    assert all(s(logits) == int(np.argmax(logits)) for _ in range(20))


def test_top_p_keeps_only_the_nucleus():
    from worker.engine import Sampler

    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.7, repetition_penalty=1.0, seed=0))
    assert {s(logits) for _ in range(300)} == {0, 1}


def test_repetition_penalty_demotes_seen_tokens():
    from worker.engine import Sampler

    logits = np.array([2.0, 1.9, -1.0], dtype=np.float32)
    s = Sampler(SamplingParams(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.5))
    assert s(logits, previous=[0]) == 1


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"max_tokens": 0}, {"top_k": -1}])
def test_invalid_sampling_params_are_refused(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


# limits and control ----------------------------------------------------------

def test_max_tokens_limit_ends_with_length(local_model):
    gen = local_model.chat([{"role": "user", "content": "Count from one to one hundred."}], SamplingParams.greedy(5))
    list(gen)
    assert gen.finish_reason == "length" and gen.completion_tokens == 5


def test_prompt_longer_than_context_gives_a_message_not_an_exception(local_model):
    ids = [30914] * (local_model.context_length + 5)
    gen = local_model.generate(ids, SamplingParams.greedy(4))
    assert list(gen) == []
    assert gen.finish_reason == "context" and "shorter" in gen.notice


def test_long_history_is_trimmed_oldest_first(local_model, monkeypatch):
    monkeypatch.setattr(local_model, "context_length", 200)
    history = []
    for i in range(12):
        history += [{"role": "user", "content": f"Question number {i} about the weather today?"},
                    {"role": "assistant", "content": f"Answer number {i}: it is sunny and warm."}]
    history.append({"role": "user", "content": "LAST QUESTION"})
    gen = local_model.chat(history, SamplingParams.greedy(8))
    assert gen.dropped_messages > 0 and "oldest" in gen.notice
    text = local_model.tokenizer.decode(gen.prompt_ids)
    assert "LAST QUESTION" in text and "Question number 0 " not in text
    assert len(gen.prompt_ids) + 8 <= 200


def test_cancel_stops_generation_promptly(local_model):
    cancel = threading.Event()
    gen = local_model.chat([{"role": "user", "content": "Write a long essay about rivers."}], SamplingParams.greedy(200), cancel)
    pieces = []
    for p in gen:
        pieces.append(p)
        cancel.set()
    assert gen.finish_reason == "cancelled" and len(gen.generated_ids) <= 2


def test_missing_and_unsupported_model_files_raise_a_clear_error(tmp_path):
    import gguf

    with pytest.raises(ModelLoadError, match="does not exist"):
        LocalModel.load(str(tmp_path / "nope.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        LocalModel.load(str(junk))
    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.add_block_count(1)
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ModelLoadError, match="only the Llama architecture"):
        LocalModel.load(str(other))


@pytest.mark.e2e
@pytest.mark.parametrize("extra", [[], ["--blocks-per-stage", "10"]])
def test_cli_json_output_matches_reference(extra):
    ref = reference("france")
    out = subprocess.run(
        [sys.executable, "-m", "worker.engine", "--chat", "What is the capital of France?", "--greedy",
         "--max-tokens", "16", "--json", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    )
    data = json.loads(out.stdout)
    assert data["prompt_ids"] == ref["prompt_ids"]
    assert data["generated_ids"] == ref["greedy_ids"][:7]
    assert data["text"] == "The capital of France is Paris." and data["finish_reason"] == "stop"


@pytest.mark.e2e
def test_cli_reports_a_missing_model_without_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "worker.engine", "hi", "--model", str(tmp_path / "x.gguf")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_chunked_prefill_equals_one_pass(local_model):
    from worker.engine.model import prefill

    ids = reference("persian_greeting")["prompt_ids"]
    p = local_model.pipeline
    whole = p.forward("one", np.array(ids), 0)[0]
    chunked = prefill(p, "chunks", ids, chunk=7)
    assert p.stages[0].session_length("chunks") == len(ids)
    p.drop_session("one"); p.drop_session("chunks")
    np.testing.assert_allclose(chunked, whole, atol=1e-4)
    assert int(np.argmax(chunked)) == reference("persian_greeting")["greedy_ids"][0]


def test_trimming_drops_the_fewest_messages_that_fit(local_model, monkeypatch):
    monkeypatch.setattr(local_model, "context_length", 400)
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " + "word " * 20}
               for i in range(15)]
    gen = local_model.chat(history, SamplingParams.greedy(8))
    d = gen.dropped_messages
    budget = 400 - 8
    assert len(gen.prompt_ids) <= budget
    assert len(local_model.tokenizer.encode_chat(history[d - 1:])) > budget  # one fewer drop would not fit


def test_kv_cache_grows_geometrically():
    from worker.engine.kv_cache import KVCache

    kv = KVCache(1, 1, 2)
    caps = set()
    for pos in range(5000):
        kv.write(0, np.zeros((1, 1, 2), np.float32), np.zeros((1, 1, 2), np.float32), pos)
        kv.commit(pos + 1)
        caps.add(kv.capacity)
    assert sorted(caps) == [256, 512, 1024, 2048, 4096, 8192]
