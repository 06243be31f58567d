"""cluster/jobdata.py: a job's data and the token ids of its prompts and supervised responses."""

from __future__ import annotations

import json

from protege.cluster.jobdata import Encoder, load_job_data
from protege.core.spec import parse_spec


def test_sft_targets_are_the_response_field_verbatim_or_the_answer_format(tmp_path, tiny_models):
    from transformers import AutoTokenizer

    rows = [
        {"prompt": f"What is {a} + 1?", "answer": str(a + 1), "trace": f"{a} then one more: {a + 1}"} for a in range(6)
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = AutoTokenizer.from_pretrained(tiny_models["student"])
    enc = Encoder(tok, system_prompt=None, max_prompt_tokens=64)
    base = {"models": {"student": {"path": tiny_models["student"]}}, "algorithm": {"type": "sft"}}
    traced = parse_spec({**base, "data": {"path": str(path), "response_field": "trace", "eval_size": 2}})
    train, held = load_job_data(traced)
    e = train[0]
    assert enc.example_target(e) == tok.encode(e.meta["response"], add_special_tokens=False) + [tok.eos_token_id]
    assert tok.decode(enc.example_target(e)[:-1]) == next(r["trace"] for r in rows if r["prompt"] == e.prompt)
    plain = parse_spec({**base, "data": {"path": str(path), "eval_size": 2}})
    e = load_job_data(plain)[0][0]
    assert enc.example_target(e) == enc.answer_target(e.answer)
    assert tok.decode(enc.example_target(e)[:-1]) == f"<answer>{e.answer}</answer>"


def test_prompt_template_shapes_the_user_turn_but_not_teacher_requests(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["student"])
    base = {"models": {"student": {"path": tiny_models["student"]}}, "data": {"task": "chain_sum"}}
    default = Encoder.for_spec(tok, parse_spec(base))
    boxed = Encoder.for_spec(
        tok,
        parse_spec({**base, "data": {"task": "chain_sum", "prompt_template": "Q: {question}\nPut it in \\boxed{}."}}),
    )

    def user_turn(ids):
        return tok.apply_chat_template([{"role": "user", "content": ids}], add_generation_prompt=True, tokenize=False)

    assert tok.decode(default.prompt("2 + 3?")) == user_turn(
        "2 + 3?\n\nGive only the final answer inside <answer></answer>."
    )
    assert tok.decode(boxed.prompt("2 + 3?")) == user_turn("Q: 2 + 3?\nPut it in \\boxed{}.")
    assert tok.decode(boxed.prompt("2 + 3?", hint="add")) == user_turn("Q: 2 + 3?\n\nHint: add\nPut it in \\boxed{}.")
    # a request to the teacher (KEPO's hint request) is its own text under either template
    assert boxed.prompt("write a hint", raw=True) == default.prompt("write a hint", raw=True)
    assert tok.decode(boxed.prompt("write a hint", raw=True)) == user_turn("write a hint")
