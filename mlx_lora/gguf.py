"""GGUF files (llama family) as mlx-lm models, with their quantized blocks kept as they are.

MLX reads GGUF weights itself (`mx.load`): Q4_0, Q4_1 and Q8_0 tensors arrive as MLX affine
triplets (packed weight, scales, biases) with groups of 32, which become the frozen base
directly; no dequantize-requantize round trip (re-quantizing SmolLM2's 4-bit weights at group
64 breaks the model). llama.cpp's converter permutes the rows of Q and K for its rope layout;
we undo that on the packed rows. The tokenizer and chat template are rebuilt from the file's
metadata by transformers.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

SUPPORTED_ARCHITECTURES = ("llama",)
# GGML tensor types MLX loads in a form we can use (others, e.g. K-quants, are refused).
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")
GGUF_GROUP_SIZE = 32  # llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks hold 32 weights each

BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# HF tokenizer pre-tokenizers matching llama.cpp's `tokenizer.ggml.pre` types that split digits.
DIGIT_SPLITTING_PRE = ("smollm", "deepseek-llm", "deepseek-coder", "starcoder", "refact", "command-r")


def _meta_value(meta: dict, key: str, path: Path, default=None):
    if key not in meta:
        if default is not None:
            return default
        raise ValueError(f"{path}: GGUF metadata has no '{key}'; the file is incomplete or not a llama-family model")
    value = meta[key]
    return value.item() if isinstance(value, mx.array) else value


def tensor_types(path: Path) -> dict[str, str]:
    """GGML type name of every tensor, read from the file header (memory-mapped, no weights loaded)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in reader.tensors}


def hf_config_from_metadata(meta: dict, weights: dict, path: Path) -> dict:
    """A Hugging Face style config.json for a llama GGUF."""
    arch = _meta_value(meta, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture '{arch}' is not supported (supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}); use a Hugging Face folder of the model instead")
    if "rope_freqs.weight" in weights:
        raise ValueError(f"{path}: rope frequency factors (Llama 3.1-style long-context scaling) are not supported "
                         "from GGUF yet; use the model's Hugging Face folder instead")
    heads = int(_meta_value(meta, f"{arch}.attention.head_count", path))
    hidden = int(_meta_value(meta, f"{arch}.embedding_length", path))
    vocab = meta.get("tokenizer.ggml.tokens")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(_meta_value(meta, f"{arch}.block_count", path)),
        "intermediate_size": int(_meta_value(meta, f"{arch}.feed_forward_length", path)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_meta_value(meta, f"{arch}.attention.head_count_kv", path, heads)),
        "head_dim": int(_meta_value(meta, f"{arch}.rope.dimension_count", path, hidden // heads)),
        "rms_norm_eps": float(_meta_value(meta, f"{arch}.attention.layer_norm_rms_epsilon", path)),
        "rope_theta": float(_meta_value(meta, f"{arch}.rope.freq_base", path, 10000.0)),
        "max_position_embeddings": int(_meta_value(meta, f"{arch}.context_length", path, 2048)),
        "vocab_size": int(_meta_value(meta, f"{arch}.vocab_size", path, len(vocab) if vocab else 0)),
        "tie_word_embeddings": "output.weight" not in weights,
        "bos_token_id": int(_meta_value(meta, "tokenizer.ggml.bos_token_id", path, -1)),
        "eos_token_id": int(_meta_value(meta, "tokenizer.ggml.eos_token_id", path, -1)),
        "torch_dtype": "float32",
    }
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(_meta_value(meta, f"{arch}.rope.scaling.factor", path))}
    if config["vocab_size"] <= 0:
        raise ValueError(f"{path}: cannot tell the vocabulary size (no {arch}.vocab_size nor tokenizer.ggml.tokens)")
    return config


def unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's rope row permutation (HF -> GGUF) on a (rows, ...) array of Q or K."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    # GGUF rows are (head, half, pair); HF wants (head, pair, half).
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def map_weights(weights: dict, config: dict) -> dict[str, mx.array]:
    """GGUF tensor names to mlx-lm llama names, with Q/K rows back in Hugging Face order."""
    mapped = {}
    for name, value in weights.items():
        module, _, leaf = name.rpartition(".")
        if module.startswith("blk."):
            _, index, part = module.split(".", 2)
            if part not in BLOCK_NAMES:
                raise ValueError(f"unexpected GGUF tensor {name}")
            if part in ("attn_q", "attn_k"):
                heads = config["num_attention_heads"] if part == "attn_q" else config["num_key_value_heads"]
                value = unpermute_rows(value, heads)
            mapped[f"model.layers.{index}.{BLOCK_NAMES[part]}.{leaf}"] = value
        elif module in TOP_NAMES:
            mapped[f"{TOP_NAMES[module]}.{leaf}"] = value
        else:
            raise ValueError(f"unexpected GGUF tensor {name}")
    return mapped


def quantized_bits(mapped: dict) -> dict[str, int]:
    """Module path -> bits, for every module whose tensors arrived quantized."""
    bits = {}
    for key, scales in mapped.items():
        if key.endswith(".scales"):
            module = key[: -len(".scales")]
            packed = mapped[f"{module}.weight"]
            input_dims = scales.shape[-1] * GGUF_GROUP_SIZE
            bits[module] = packed.shape[-1] * 32 // input_dims  # a uint32 packs 32 // bits weights
    return bits


def load_gguf(path: str | Path):
    """(mlx-lm llama model, TokenizerWrapper, HF-style config) from a GGUF file, quantized blocks kept."""
    from mlx_lm.models import llama

    path = Path(path)
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (bad magic number)")
    unsupported = {n: t for n, t in tensor_types(path).items() if t not in SUPPORTED_TENSOR_TYPES}
    if unsupported:
        examples = ", ".join(f"{n} ({t})" for n, t in list(unsupported.items())[:3])
        raise ValueError(f"{path}: tensor types not supported: {examples}; supported are "
                         f"{', '.join(SUPPORTED_TENSOR_TYPES)}. Use a Q4_0, Q4_1, Q8_0 or F16 file")
    weights, meta = mx.load(str(path), return_metadata=True)
    config = hf_config_from_metadata(meta, weights, path)
    mapped = {k: (v.astype(mx.float32) if v.dtype == mx.bfloat16 else v) for k, v in map_weights(weights, config).items()}
    bits = quantized_bits(mapped)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    nn.quantize(model, class_predicate=lambda p, m: {"group_size": GGUF_GROUP_SIZE, "bits": bits[p]} if p in bits else False)
    model.load_weights(list(mapped.items()), strict=True)
    mx.eval(model.parameters())
    if bits:
        from collections import Counter

        config["quantization"] = {"group_size": GGUF_GROUP_SIZE, "bits": Counter(bits.values()).most_common(1)[0][0]}
        # mlx-lm reads per-layer settings from here when they differ from the default
        config["quantization"].update({p: {"group_size": GGUF_GROUP_SIZE, "bits": b} for p, b in bits.items()
                                       if b != config["quantization"]["bits"]})
    return model, load_gguf_tokenizer(path, meta), config


def load_gguf_tokenizer(path: str | Path, meta: dict | None = None):
    """The tokenizer and chat template rebuilt from GGUF metadata, as an mlx-lm TokenizerWrapper."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import AutoTokenizer

    path = Path(path)
    if meta is None:
        _, meta = mx.load(str(path), return_metadata=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:  # transformers raises many types for unsupported tokenizers
        raise ValueError(f"{path}: could not rebuild the tokenizer from the GGUF metadata ({err})") from err
    pre = meta.get("tokenizer.ggml.pre")
    if pre in DIGIT_SPLITTING_PRE:
        # llama.cpp splits every digit on its own for these models before the byte-level regex.
        from tokenizers import pre_tokenizers

        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if not getattr(tokenizer, "chat_template", None) and "tokenizer.chat_template" in meta:
        tokenizer.chat_template = meta["tokenizer.chat_template"]
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = [int(eos.item())] if isinstance(eos, mx.array) else None
    return TokenizerWrapper(tokenizer, eos_token_ids=eos_ids)
