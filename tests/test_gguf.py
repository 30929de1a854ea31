"""GGUF loading: tiny random llama GGUFs written with the `gguf` package against mlx-lm references,
and the real SmolLM2 GGUF (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gguf_blocks
import tiny

mx = pytest.importorskip("mlx.core")
gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from mlx_lora.models.gguf import load_gguf, permute_rows, unpermute_rows  # noqa: E402
from mlx_lora.models.gguf_tokenizer import load_gguf_tokenizer  # noqa: E402

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2  # 256: K-quant rows hold 256-weight super-blocks
PROMPT_IDS = [5, 17, 42, 99, 3, 250, 7, 1]


def _tokenizer_fields(folder: Path) -> tuple[list[str], list[str], list[int]]:
    """tokens (by id), merges ("a b") and GGUF token types of the tiny byte-level BPE."""
    tiny.make_tokenizer(folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    types = [3 if t in tiny.SPECIALS else 1 for t in tokens]  # 3 is CONTROL, 1 NORMAL
    return tokens, merges, types


def _encode_tensor(x: np.ndarray, kind: T, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(bytes or floats to write, the float32 values llama.cpp would decode, by gguf's reference)."""
    if kind == T.F32:
        return x, x
    if kind in (T.F16, T.BF16) or kind.name not in gguf_blocks.F16_FIELDS:
        raw = quantize(x, kind)
        return raw, dequantize(raw, kind).astype(np.float32)
    raw = gguf_blocks.quantize(x, kind.name)  # ours for K-quants (gguf cannot), gguf's for the others
    return raw, dequantize(raw, kind).astype(np.float32)


def write_tiny_gguf(folder: Path, types: dict[str, T], tied: bool = False, pre: str = "smollm",
                    seed: int = 0, skip_keys: tuple[str, ...] = (), arch: str = "llama",
                    add_bos: bool = False, embed_scale: float = 1.0) -> tuple[Path, dict, dict[str, np.ndarray]]:
    """A 2-block llama GGUF as llama.cpp writes it (Q/K rows permuted), and the Hugging Face
    config and float weights an mlx-lm reference model needs to match it.

    `types` maps "linear", "embed", "output" to the GGML type of those tensors.
    """
    rng = np.random.default_rng(seed)
    tokens, merges, token_types = _tokenizer_fields(folder / "tok")
    vocab = len(tokens)
    head_dim = HIDDEN // HEADS
    shapes = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV_HEADS * head_dim, HIDDEN),
              "v_proj": (KV_HEADS * head_dim, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
              "gate_proj": (FFN, HIDDEN), "up_proj": (FFN, HIDDEN), "down_proj": (HIDDEN, FFN)}
    gguf_names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                  "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    path = folder / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    meta = {
        "block_count": lambda: writer.add_block_count(LAYERS),
        "context_length": lambda: writer.add_context_length(512),
        "embedding_length": lambda: writer.add_embedding_length(HIDDEN),
        "feed_forward_length": lambda: writer.add_feed_forward_length(FFN),
        "head_count": lambda: writer.add_head_count(HEADS),
        "head_count_kv": lambda: writer.add_head_count_kv(KV_HEADS),
        "rms_eps": lambda: writer.add_layer_norm_rms_eps(1e-5),
        "rope_freq_base": lambda: writer.add_rope_freq_base(10000.0),
        "rope_dimension_count": lambda: writer.add_rope_dimension_count(head_dim),
        "vocab_size": lambda: writer.add_vocab_size(vocab),
    }
    for key, add in meta.items():
        if key not in skip_keys:
            add()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(tiny.CHATML)

    reference: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, x: np.ndarray, kind: T, heads: int | None = None) -> None:
        # llama.cpp permutes Q/K rows before quantizing; blocks lie within rows, so decoding the
        # permuted tensor and un-permuting equals decoding the original: the reference is in HF order.
        stored, decoded = _encode_tensor(permute_rows(x, heads) if heads else x, kind, rng)
        writer.add_tensor(gguf_name, stored, raw_dtype=None if kind == T.F32 else kind)
        reference[hf_name] = unpermute_rows(decoded, heads) if heads else decoded

    embed = rng.normal(0, embed_scale, (vocab, HIDDEN)).astype(np.float32)
    add("token_embd.weight", "model.embed_tokens.weight", embed, types["embed"])
    for i in range(LAYERS):
        for hf, shape in shapes.items():
            heads = HEADS if hf == "q_proj" else KV_HEADS if hf == "k_proj" else None
            x = rng.normal(0, shape[1] ** -0.5, shape).astype(np.float32)
            sub = "self_attn" if hf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            add(f"blk.{i}.{gguf_names[hf]}.weight", f"model.layers.{i}.{sub}.{hf}.weight", x, types["linear"], heads)
        for gguf_norm, hf_norm in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            add(f"blk.{i}.{gguf_norm}.weight", f"model.layers.{i}.{hf_norm}.weight",
                rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32), T.F32)
    add("output_norm.weight", "model.norm.weight", rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32), T.F32)
    if not tied:
        add("output.weight", "lm_head.weight", rng.normal(0, HIDDEN ** -0.5, (vocab, HIDDEN)).astype(np.float32), types["output"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = tiny.tiny_config(vocab, HIDDEN, LAYERS)
    config.update(intermediate_size=FFN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  tie_word_embeddings=tied, max_position_embeddings=512)
    return path, config, reference


def reference_logits(config: dict, weights: dict[str, np.ndarray]) -> np.ndarray:
    """Logits of a float32 mlx-lm llama built directly from Hugging Face-order weights."""
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.load_weights([(k, mx.array(v.astype(np.float32))) for k, v in weights.items()], strict=True)
    return np.array(model(mx.array([PROMPT_IDS])).astype(mx.float32))


def model_logits(model) -> np.ndarray:
    return np.array(model(mx.array([PROMPT_IDS])).astype(mx.float32))


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads in (8, 2):
        permuted = permute_rows(w, heads)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(unpermute_rows(permuted, heads), w)
        np.testing.assert_array_equal(np.array(unpermute_rows(mx.array(permuted), heads)), w)


# (linear, embedding, output) types, and whether the output is tied to the embedding
CASES = {
    "f32": ({"linear": T.F32, "embed": T.F32, "output": T.F32}, False),
    "q4_1-tied-q8_0-embed": ({"linear": T.Q4_1, "embed": T.Q8_0}, True),  # SmolLM2's layout
    "q4_0-q6_k-output": ({"linear": T.Q4_0, "embed": T.F16, "output": T.Q6_K}, False),
    "q8_0-bf16-embed": ({"linear": T.Q8_0, "embed": T.BF16, "output": T.BF16}, False),
    "q4_k-q6_k": ({"linear": T.Q4_K, "embed": T.Q4_K, "output": T.Q6_K}, False),  # Q4_K_M's main types
    "q5_k": ({"linear": T.Q5_K, "embed": T.Q5_K, "output": T.Q8_0}, False),
    "q5_0": ({"linear": T.Q5_0, "embed": T.F32, "output": T.Q5_1}, False),
    "q3_k-q2_k": ({"linear": T.Q3_K, "embed": T.F32, "output": T.Q2_K}, False),
}
# Types MLX holds re-quantized (no group size 16 in MLX): their logits carry that error too.
REQUANTIZED = {T.Q6_K, T.Q3_K, T.Q2_K}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_reference_built_from_decoded_weights(tmp_path, case):
    """The reference decodes every tensor with gguf.quants.dequantize and runs a float32 mlx-lm llama."""
    types, tied = CASES[case]
    path, config, weights = write_tiny_gguf(tmp_path, types, tied=tied)
    model, _, hf_config, report = load_gguf(path)
    model.set_dtype(mx.float32)
    expected = reference_logits(config, weights)
    got = model_logits(model)
    # native blocks: only float32 summation order remains (~1e-6 of the range); re-quantized
    # types (8-bit / 4-bit groups of 32 over ggml's 16-weight sub-blocks) add their weight error
    tolerance = 2e-2 if REQUANTIZED & set(types.values()) else 1e-5
    np.testing.assert_allclose(got, expected, atol=tolerance * np.abs(expected).max(), rtol=0)
    assert hf_config["tie_word_embeddings"] is tied
    assert hf_config["num_key_value_heads"] == KV_HEADS and hf_config["head_dim"] == HIDDEN // HEADS
    for kind in set(types.values()):
        entry = report.tensor_types[kind.name]
        assert (entry.relative_error == 0) == (kind not in REQUANTIZED), (kind, entry)


def test_reference_comparison_detects_a_missing_unpermute(tmp_path, monkeypatch):
    import mlx_lora.models.gguf as gguf_module

    path, config, weights = write_tiny_gguf(tmp_path, {"linear": T.Q4_1, "embed": T.Q8_0}, tied=True)
    monkeypatch.setattr(gguf_module, "unpermute_rows", lambda w, heads: w)
    model, _, _, _ = load_gguf(path)
    model.set_dtype(mx.float32)
    expected = reference_logits(config, weights)
    assert np.abs(model_logits(model) - expected).max() > 1e-2 * np.abs(expected).max()


def test_bf16_tensors_keep_their_range(tmp_path):
    # mx.load narrows BF16 to float16, whose largest value is 65504
    path, _, weights = write_tiny_gguf(tmp_path, {"linear": T.F32, "embed": T.BF16, "output": T.F32},
                                       embed_scale=1e5)
    model, _, hf_config, _ = load_gguf(path)
    embed = model.model.embed_tokens.weight
    assert embed.dtype == mx.bfloat16 and hf_config["torch_dtype"] == "bfloat16"
    np.testing.assert_array_equal(np.array(embed.astype(mx.float32)), weights["model.embed_tokens.weight"])


def test_add_bos_token_from_metadata(tmp_path):
    path, _, _ = write_tiny_gguf(tmp_path, {"linear": T.F32, "embed": T.F32, "output": T.F32}, add_bos=True)
    tokenizer = load_gguf_tokenizer(path)
    assert tokenizer.encode("hi")[0] == tokenizer.get_vocab()["<|im_start|>"]


def test_quantized_blocks_are_kept_with_their_bits(tmp_path):
    import mlx.nn as nn

    path, _, _ = write_tiny_gguf(tmp_path, {"linear": T.Q4_1, "embed": T.Q8_0}, tied=True)
    model, _, hf_config, _ = load_gguf(path)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and (q_proj.group_size, q_proj.bits) == (32, 4)
    embed = model.model.embed_tokens
    assert isinstance(embed, nn.QuantizedEmbedding) and (embed.group_size, embed.bits) == (32, 8)
    assert isinstance(model.model.layers[0].input_layernorm, nn.RMSNorm)
    assert hf_config["quantization"]["group_size"] == 32 and hf_config["quantization"]["bits"] == 4
    assert hf_config["quantization"]["model.embed_tokens"]["bits"] == 8


def test_saved_copy_reloads_with_mlx_lm(tmp_path):
    from mlx_lm.utils import load_model, save_config, save_model

    path, _, _ = write_tiny_gguf(tmp_path, {"linear": T.Q4_1, "embed": T.Q8_0}, tied=True)
    model, _, hf_config, _ = load_gguf(path)
    out = tmp_path / "saved"
    save_model(out, model)
    save_config(dict(hf_config), out / "config.json")
    reloaded, _ = load_model(out)
    np.testing.assert_array_equal(model_logits(reloaded), model_logits(model))


def test_tokenizer_from_metadata_splits_digits_and_renders_chatml(tmp_path):
    path, _, _ = write_tiny_gguf(tmp_path, {"linear": T.F32, "embed": T.F32, "output": T.F32})
    tokenizer = load_gguf_tokenizer(path)
    vocab = tokenizer.get_vocab()
    assert any(len(t) > 1 and t.isdigit() for t in vocab), "the tiny vocabulary must hold multi-digit tokens"
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("2021-03-07")]
    assert pieces == list("2021-03-07")
    text = "Ünïcode — 日本 ✓ and  two  spaces\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_token_ids == {vocab["<|im_end|>"]}
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.encode("hi")[0] != vocab["<|im_start|>"]  # add_bos_token is false


def test_gpt2_pre_tokenizer_keeps_digits_together(tmp_path):
    path, _, _ = write_tiny_gguf(tmp_path, {"linear": T.F32, "embed": T.F32, "output": T.F32}, pre="gpt-2")
    tokenizer = load_gguf_tokenizer(path)
    assert len(tokenizer.encode("2021")) < 4


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(path)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_gguf(tmp_path / "missing.gguf")


def test_an_ollama_blob_without_a_gguf_suffix_is_read_by_its_magic(tmp_path):
    from mlx_lora.memory.shape import read_shape
    from mlx_lora.models.sources import resolve_source

    path, _, _ = write_tiny_gguf(tmp_path, {"linear": T.F32, "embed": T.F32, "output": T.F32})
    blob = tmp_path / "blobs" / "sha256-6a0746a1ec1aef3e7ec53868f220ff6e389f6f8ef87a01d77c96807de94ca2aa"
    blob.parent.mkdir()
    blob.write_bytes(path.read_bytes())  # how Ollama keeps a model: named by its digest
    assert resolve_source(str(blob)) == ("gguf", blob)
    assert read_shape(str(blob)) == read_shape(str(path))
    other = tmp_path / "notes"
    other.write_text("not a model")
    with pytest.raises(ValueError, match="does not start with the GGUF magic"):
        resolve_source(str(other))
    with pytest.raises(ValueError, match="neither a GGUF nor a config.json"):
        read_shape(str(other))


def test_truncated_gguf(tmp_path):
    path, _, _ = write_tiny_gguf(tmp_path, {"linear": T.F32, "embed": T.F32, "output": T.F32})
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:5000])  # inside the vocabulary metadata
    with pytest.raises(ValueError, match="cut.gguf: the GGUF header is truncated or corrupt"):
        load_gguf(cut)


def test_unsupported_architecture(tmp_path):
    path, _, _ = write_tiny_gguf(tmp_path, {"linear": T.F32, "embed": T.F32, "output": T.F32}, arch="falcon")
    with pytest.raises(ValueError, match=r"general.architecture is 'falcon'.*supported: llama"):
        load_gguf(path)


def test_missing_metadata_key(tmp_path):
    path, _, _ = write_tiny_gguf(tmp_path, {"linear": T.F32, "embed": T.F32, "output": T.F32},
                                 skip_keys=("feed_forward_length",))
    with pytest.raises(ValueError, match="llama.feed_forward_length"):
        load_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    path, _, _ = write_tiny_gguf(tmp_path, {"linear": T.F32, "embed": T.F32, "output": T.F32})
    # rewrite one tensor's type id to IQ4_XS (same header size): a type the kit does not hold
    from mlx_lora.models.gguf_file import read_header

    data = bytearray(path.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(name) + len(name) + 4 + 8 * 2  # n_dims (uint32), two dims (uint64)
    data[at: at + 4] = int(T.IQ4_XS).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    assert read_header(path).tensors["blk.0.attn_q.weight"].type_name == "IQ4_XS"
    with pytest.raises(ValueError, match=r"tiny.gguf: tensor types mlx-lora cannot load: blk.0.attn_q.weight "
                                         r"\(IQ4_XS\); supported are F32.*Q4_K.*Hugging Face folder"):
        load_gguf(path)


def test_unknown_pre_tokenizer(tmp_path):
    path, _, _ = write_tiny_gguf(tmp_path, {"linear": T.F32, "embed": T.F32, "output": T.F32}, pre="deepseek-llm")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre is 'deepseek-llm'"):
        load_gguf_tokenizer(path)


# ---- the real SmolLM2-135M-Instruct Q4_1 GGUF (fixture `smollm2_gguf` in conftest.py) ----




@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_gguf(smollm2_gguf)


@pytest.mark.slow
def test_smollm2_quantized_logits_match_dequantized_float_model(smollm2_gguf):
    from mlx_lm.utils import dequantize_model

    model, tokenizer, _, _ = load_gguf(smollm2_gguf)  # own copy: dequantize_model changes it in place
    ids = mx.array([tokenizer.encode("The capital of France is")])
    as_loaded = np.array(model(ids).astype(mx.float32))
    model.set_dtype(mx.float32)  # float32 scales and biases, so the dequantized weights are exact
    quantized = np.array(model(ids).astype(mx.float32))
    dense = np.array(dequantize_model(model)(ids).astype(mx.float32))
    # Same decoded weights, different kernels: float32 summation noise on logits of range ~30.
    assert np.abs(quantized - dense).max() < 1e-3  # measured 8e-5
    # As loaded, the 8-bit embedding returns float16 (its scales are the file's float16), so
    # the first layer runs in float16: differences of ~0.02 (measured 0.018).
    assert np.abs(as_loaded - dense).max() < 0.1
    assert int(as_loaded[0, -1].argmax()) == int(dense[0, -1].argmax())


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2):
    from mlx_lm import generate

    model, tokenizer, *_ = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    assert "Paris" in generate(model, tokenizer, prompt, max_tokens=20)


@pytest.mark.slow
def test_smollm2_tokenizer_splits_digits_and_uses_chatml(smollm2):
    _, tokenizer, hf_config, _ = smollm2
    ids = tokenizer.encode("2021-03-07")
    assert [tokenizer.decode([i]) for i in ids] == list("2021-03-07")
    assert tokenizer.eos_token_ids == {2} and tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert rendered.startswith("<|im_start|>system\n")
    assert hf_config["quantization"]["bits"] == 4 and hf_config["tie_word_embeddings"] is True


TOKENIZER_TEXTS = [
    "Convert March 7, 2021 to ISO: 2021-03-07", "  leading and trailing spaces  ", "tabs\tand\nnew\n\nlines",
    "Ünïcode — 日本語 ✓ émoji 🤖👍🏽", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x**2  # 3.14159", "HTTP/1.1 200 OK; id=0x1F, 1,234,567.89", "don't won't it's I'm",
]


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_rebuild_with_llama_cpp_split(smollm2_gguf):
    pytest.importorskip("torch")  # transformers' GGUF reader needs it; ours does not
    from transformers import AutoTokenizer

    from mlx_lora.models.gguf_file import read_header
    from mlx_lora.models.gguf_tokenizer import _pre_tokenizer_for

    header = read_header(smollm2_gguf)
    ours = load_gguf_tokenizer(smollm2_gguf)
    theirs = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    theirs.backend_tokenizer.pre_tokenizer = _pre_tokenizer_for(header.metadata["tokenizer.ggml.pre"], header)
    assert len(ours.get_vocab()) == len(theirs.get_vocab())
    for text in TOKENIZER_TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    assert ours.eos_token_id == theirs.eos_token_id and ours.bos_token_id == theirs.bos_token_id


def test_byte_level_tokenizer_loads_without_torch(tmp_path):
    path, _, _ = write_tiny_gguf(tmp_path, {"linear": T.F32, "embed": T.F32, "output": T.F32})
    script = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "from mlx_lora.models.gguf_tokenizer import load_gguf_tokenizer\n"
        f"tokenizer = load_gguf_tokenizer({str(path)!r})\n"
        "print(tokenizer.decode(tokenizer.encode('2021-03-07 ok')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("2021-03-07 ok")


def write_sentencepiece_gguf(path: Path, arch: str) -> Path:
    """A GGUF with a small SentencePiece-style vocabulary (`tokenizer.ggml.model` 'llama': Mistral,
    Gemma and Phi-3 files): byte fallback tokens, scored pieces with the U+2581 word marker."""
    pieces = ["\u2581", "\u2581h", "\u2581he", "\u2581hello", "l", "o", "e", "h", "\u2581w", "\u2581wor",
              "\u2581world", "r", "d", "w", "\u25812", "0", "1", "<|user|>", "<|end|>"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 2) + [3, 3]  # unknown, control, byte, normal
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}")
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


SENTENCEPIECE_TEXTS = ["hello world", " hello", "héllo wörld\n x 2021", "<|user|>hello<|end|>", ""]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_sentencepiece_tokenizer_equals_transformers_gguf_reader(tmp_path, arch):
    pytest.importorskip("torch", reason="the reference, transformers' GGUF reader, needs PyTorch")
    from transformers import AutoTokenizer

    path = write_sentencepiece_gguf(tmp_path / "spm.gguf", arch)
    ours = load_gguf_tokenizer(path)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in SENTENCEPIECE_TEXTS:
        assert ours.encode(text) == reference.encode(text), text
    assert ours.encode("hello")[0] == 1  # llama.cpp adds BOS to a SentencePiece vocabulary
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|user|>hi<|end|>"


def test_sentencepiece_tokenizer_loads_without_torch(tmp_path):
    path = write_sentencepiece_gguf(tmp_path / "spm.gguf", "llama")
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from mlx_lora.models.gguf_tokenizer import load_gguf_tokenizer\n"
        f"tokenizer = load_gguf_tokenizer({str(path)!r})\n"
        "print(tokenizer.encode('hello world'))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].startswith("[1, ")


@pytest.mark.slow
def test_smollm2_as_q4_k_m_still_answers_paris(smollm2_gguf, tmp_path):
    """The demo rewritten with K-quant blocks by our own block writer, as in a Q4_K_M file: ffn_down
    Q4_K and Q6_K in alternate blocks. SmolLM2's other rows (576 wide) are not whole 256-weight
    super-blocks, so llama.cpp falls back there; we use Q8_0 (its Q5_0 fallback, a second lossy
    rounding of the Q4_1 weights, already makes this 135M model miss the answer)."""
    from mlx_lm import generate

    from mlx_lm.utils import dequantize_model

    from mlx_lora.models.gguf_export import export_gguf

    model, tokenizer, config, _ = load_gguf(smollm2_gguf)
    float_model = dequantize_model(model)

    def encode(name, array):
        kind = ("Q6_K" if int(name.split(".")[1]) % 2 else "Q4_K") if "ffn_down" in name else "Q8_0"
        return gguf_blocks.quantize(array, kind), T[kind]

    path = export_gguf(tmp_path / "q4_k_m.gguf", float_model, {k: v for k, v in config.items() if "quantiz" not in k},
                       tokenizer, source_gguf=smollm2_gguf, encode=encode)
    converted, tokenizer, _, report = load_gguf(path)
    assert {"Q4_K", "Q6_K", "Q8_0"} <= set(report.tensor_types)
    assert report.tensor_types["Q4_K"].held_as.startswith("native")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    assert "Paris" in generate(converted, tokenizer, prompt, max_tokens=20)


@pytest.mark.parametrize("linear", [T.Q4_K, T.Q5_K, T.Q6_K])
def test_k_quant_base_trains_and_both_frozen_paths_agree(tmp_path, linear, tiny_data_dir):
    """QLoRA on a K-quant GGUF base: the CPU (dequantize + BLAS) and GPU (fused quantized_matmul)
    products give the same logits, and a few steps lower the loss."""
    from mlx_lora.config import DataConfig, LoraConfig, TrainingConfig
    from mlx_lora.data import load_datasets
    from mlx_lora.frozen_matmul import force_path, use_fast_frozen_layers
    from mlx_lora.lora import apply_lora
    from mlx_lora.train import train

    path, _, _ = write_tiny_gguf(tmp_path, {"linear": linear, "embed": T.Q8_0, "output": T.Q6_K})
    model, tokenizer, _, _ = load_gguf(path)
    use_fast_frozen_layers(model)
    mx.random.seed(0)
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    with force_path("dequantize"):
        cpu = model_logits(model)
    with force_path("fused"):
        gpu = model_logits(model)
    np.testing.assert_allclose(cpu, gpu, atol=1e-4 * np.abs(gpu).max(), rtol=0)

    losses = []

    class Recorder:
        on_start = on_checkpoint = on_interrupt = on_end = staticmethod(lambda *args: None)

        def on_report(self, report):
            losses.append(report.train_loss)

    data, _ = load_datasets(DataConfig(path=str(tiny_data_dir)), tokenizer)
    train(model, data["train"], data["valid"], TrainingConfig(iters=8, batch_size=4, learning_rate=5e-3,
                                                              steps_per_report=1, steps_per_eval=0, save_every=0),
          tmp_path / "run", callbacks=[Recorder()])
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
