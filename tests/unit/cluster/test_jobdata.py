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
