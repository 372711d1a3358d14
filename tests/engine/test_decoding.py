"""worker.engine.decoding.Decoder and SamplingParams' wire form: the step both generation loops share."""
import numpy as np
import pytest

from tests.support.reference import reference, reference_logits
from worker.engine import Decoder, SamplingParams
from worker.engine.model import prefill


@pytest.mark.parametrize("max_tokens, finish", [(4, "length"), (32, "stop")])
def test_greedy_decoder_reproduces_the_reference_ids(local_model, max_tokens, finish):
    ref = reference("france")
    m = local_model
    decoder = Decoder(m.tokenizer, SamplingParams.greedy(max_tokens=max_tokens), ref["prompt_ids"])
    logits = prefill(m.pipeline, "dec-test", ref["prompt_ids"])
    pos, ids = len(ref["prompt_ids"]), []
    try:
        while True:
            step = decoder.step(logits)
            ids.append(step.token_id)
            if step.done:
                break
            logits = m.pipeline.forward("dec-test", np.asarray([step.token_id]), pos)[0]
            pos += 1
    finally:
        m.pipeline.drop_session("dec-test")
    answer = ref["greedy_ids"][:ref["greedy_ids"].index(2)]  # up to <|im_end|>
    assert decoder.finish_reason == finish
    if finish == "length":
        assert ids == answer[:max_tokens]
    else:
        assert ids == answer + [None]  # the stop token ends the answer without being part of it
    assert decoder.generated_ids == [i for i in ids if i is not None]


def test_a_stop_token_ends_the_answer_without_becoming_part_of_it(local_model):
    tok = local_model.tokenizer
    stop = min(tok.stop_ids)
    logits = np.zeros(len(reference_logits("france")), dtype=np.float32)
    logits[stop] = 10.0
    decoder = Decoder(tok, SamplingParams.greedy(), [1, 2, 3])
    step = decoder.step(logits)
    assert (step.token_id, step.text, step.finish_reason) == (None, "", "stop") and decoder.generated_ids == []
    with pytest.raises(RuntimeError, match="finished"):
        decoder.step(logits)


def test_ignore_eos_keeps_going_past_a_stop_token(local_model):
    tok = local_model.tokenizer
    stop = min(tok.stop_ids)
    logits = np.zeros(len(reference_logits("france")), dtype=np.float32)
    logits[stop] = 10.0
    step = Decoder(tok, SamplingParams.greedy(), ignore_eos=True).step(logits)
    assert step.token_id == stop and not step.done


def test_sampling_params_round_trip_over_the_wire():
    p = SamplingParams(temperature=0.5, top_k=7, top_p=0.8, repetition_penalty=1.2, max_tokens=99, seed=3)
    assert SamplingParams.from_wire(p.to_wire(), max_tokens=99) == p


@pytest.mark.parametrize("wire, expected", [
    (None, SamplingParams.greedy(max_tokens=5)),
    ({"temperature": 0.0}, SamplingParams.greedy(max_tokens=5)),
    ({"temperature": None}, SamplingParams(max_tokens=5)),
    ({"temperature": 0.3, "top_k": None}, SamplingParams(temperature=0.3, max_tokens=5)),
])
def test_sampling_params_from_wire_fills_defaults(wire, expected):
    assert SamplingParams.from_wire(wire, max_tokens=5) == expected


def test_sampling_params_from_wire_refuses_out_of_range_values():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_wire({"temperature": 0.7, "top_p": 0.0}, max_tokens=5)


def _forced(vocab: int, token: int) -> np.ndarray:
    logits = np.zeros(vocab, dtype=np.float32)
    logits[token] = 10.0
    return logits


def test_an_answer_cut_mid_character_ends_without_a_replacement_character(local_model):
    tok = local_model.tokenizer
    vocab = len(reference_logits("france"))
    decoder = Decoder(tok, SamplingParams.greedy(max_tokens=3))
    # 'چ' = b'\xda' (id 165) + b'\x86' (id 224): the limit falls between its two bytes
    pieces = [decoder.step(_forced(vocab, t)).text for t in (165, 224, 165)]
    assert pieces == ["", "چ", ""] and decoder.finish_reason == "length"
    tail = decoder.flush()
    assert tail == "" and "\ufffd" not in "".join(pieces) + tail


def test_a_complete_persian_answer_comes_out_unchanged(local_model):
    tok = local_model.tokenizer
    vocab = len(reference_logits("france"))
    text = "سلام! پایتخت فرانسه پاریس است."
    ids = tok.encode(text)
    decoder = Decoder(tok, SamplingParams.greedy(max_tokens=len(ids) + 1))
    out = "".join(decoder.step(_forced(vocab, t)).text for t in ids)
    assert decoder.step(_forced(vocab, min(tok.stop_ids))).finish_reason == "stop"
    assert out + decoder.flush() == text


@pytest.mark.parametrize("penalize_prompt, first, second", [(False, 100, 200), (True, 200, 100)])
def test_the_repetition_penalty_counts_the_prompt_only_when_asked(local_model, penalize_prompt, first, second):
    tok = local_model.tokenizer
    logits = np.zeros(len(reference_logits("france")), dtype=np.float32)
    logits[100], logits[200] = 2.0, 1.5  # 100 leads, unless divided by the penalty 2.0 (-> 1.0)
    params = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=2.0)
    decoder = Decoder(tok, params, prompt_ids=[100, 9], penalize_prompt=penalize_prompt)
    assert decoder.step(logits).token_id == first
    assert decoder.step(logits).token_id == second  # what the answer holds is penalized either way
