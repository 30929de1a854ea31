"""GGUF files (llama family) as mlx-lm models, with their quantized blocks kept as they are.

MLX reads GGUF weights itself (`mx.load`): Q4_0, Q4_1 and Q8_0 tensors arrive as MLX affine
triplets (packed weight, scales, biases) with groups of 32, which become the frozen base
directly; no dequantize-requantize round trip (re-quantizing SmolLM2's 4-bit weights at group
64 breaks the model). llama.cpp's converter permutes the rows of Q and K for its rope layout;
we undo that on the packed rows. The tokenizer and chat template are rebuilt from the file's
metadata in `gguf_tokenizer.py`.

What `mx.load` does with each GGML type (checked on mlx 0.32), and so what we accept:
  F32, F16            as is.
  BF16                narrowed to float16 (overflows past 65504): we read these tensors ourselves.
  Q4_0, Q4_1, Q8_0    affine triplets, kept quantized. mlx before ml-explore/mlx#3664 decoded
                      Q4_1 wrongly, so every quantized type is checked against gguf's decoder.
  Q2_K, Q4_K, Q6_K    dequantized to float16 (the blocks are lost); accepted as float weights
                      when they pass the same check. Q4_K does not: mlx scales the odd 32-weight
                      sub-blocks with their even neighbour's scale, so Q4_K files are refused.
  anything else       `mx.load` fails ("gguf_tensor_to_f16 failed"): refused up front.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from .gguf_file import GGUFHeader, TensorInfo, read_header, required_key
from .gguf_tokenizer import load_gguf_tokenizer

SUPPORTED_ARCHITECTURES = ("llama",)
GGUF_GROUP_SIZE = 32  # llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks hold 32 weights each
NATIVE_QUANT_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # arrive as MLX affine triplets
FLOAT_TYPES = ("F32", "F16", "BF16")
DEQUANTIZED_TYPES = ("Q2_K", "Q4_K", "Q6_K")  # mx.load turns these into float16
SUPPORTED_TENSOR_TYPES = FLOAT_TYPES + NATIVE_QUANT_TYPES + DEQUANTIZED_TYPES
ADVICE = "use a Q4_0, Q4_1, Q8_0, F16 or BF16 GGUF of this model, or its Hugging Face folder"

BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

def _as_float32_text(x: float) -> float:
    """GGUF stores floats in 32 bits: 1e-5 reads back as 9.99999974e-06; give the value that was meant."""
    return float(f"{x:.7g}")


def hf_config_from_header(header: GGUFHeader) -> dict:
    """A Hugging Face style config.json for a llama GGUF."""
    meta, path = header.metadata, header.path
    arch = required_key(header, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: general.architecture is '{arch}', which is not supported (supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}); use the model's Hugging Face folder instead")
    if "rope_freqs.weight" in header.tensors:
        raise ValueError(f"{path}: rope frequency factors (Llama 3.1-style long-context scaling) are not supported "
                         "from GGUF; use the model's Hugging Face folder instead")
    if "token_embd.weight" not in header.tensors:
        raise ValueError(f"{path}: the file has no token_embd.weight tensor; it is incomplete")
    heads = int(required_key(header, f"{arch}.attention.head_count"))
    hidden = int(required_key(header, f"{arch}.embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    rope_dims = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(f"{path}: {arch}.rope.dimension_count is {rope_dims} but the head size is {head_dim}; "
                         "partial rotary embeddings are not supported for llama GGUFs")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(required_key(header, f"{arch}.block_count")),
        "intermediate_size": int(required_key(header, f"{arch}.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _as_float32_text(required_key(header, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _as_float32_text(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        # the embedding's row count, not the metadata's, is what the weights need
        "vocab_size": int(header.tensors["token_embd.weight"].shape[0]),
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "attention_bias": False,
        "mlp_bias": False,
    }
    for key, name in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        if name in meta:
            config[key] = int(meta[name])
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear",
                                  "factor": _as_float32_text(required_key(header, f"{arch}.rope.scaling.factor"))}
    elif scaling != "none":
        raise ValueError(f"{path}: {arch}.rope.scaling.type '{scaling}' is not supported from GGUF "
                         "(none and linear are); use the model's Hugging Face folder instead")
    return config


def permute_rows(w, n_heads: int):
    """llama.cpp's rope row permutation (HF -> GGUF) of Q or K rows; works on numpy and mlx arrays."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w, n_heads: int):
    """Undo `permute_rows` (GGUF -> HF). Rows are independent, so packed weights, scales and
    biases of a quantized tensor can each be unpermuted without dequantizing."""
    half = w.shape[0] // n_heads // 2
    # GGUF rows are (head, half, pair); HF wants (head, pair, half).
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def map_weights(weights: dict, config: dict, path: Path) -> dict:
    """GGUF tensor names to mlx-lm llama names, with Q/K rows back in Hugging Face order."""
    mapped = {}
    for name, value in weights.items():
        module, _, leaf = name.rpartition(".")
        if module.startswith("blk."):
            _, index, part = module.split(".", 2)
            if part not in BLOCK_NAMES:
                raise ValueError(f"{path}: unexpected tensor {name} for a llama model; use the Hugging Face folder")
            if part in ("attn_q", "attn_k"):
                heads = config["num_attention_heads"] if part == "attn_q" else config["num_key_value_heads"]
                value = unpermute_rows(value, heads)
            mapped[f"model.layers.{index}.{BLOCK_NAMES[part]}.{leaf}"] = value
        elif module in TOP_NAMES:
            mapped[f"{TOP_NAMES[module]}.{leaf}"] = value
        else:
            raise ValueError(f"{path}: unexpected tensor {name} for a llama model; use the Hugging Face folder")
    return mapped


def quantized_bits(mapped: dict) -> dict[str, int]:
    """Module path -> bits, for every module whose tensors arrived quantized."""
    bits = {}
    for key, scales in mapped.items():
        if key.endswith(".scales"):
            module = key[: -len(".scales")]
            in_features = scales.shape[-1] * GGUF_GROUP_SIZE
            # a uint32 packs 32 // bits weights, so a row of in_features weights takes in_features * bits / 32
            bits[module] = mapped[f"{module}.weight"].shape[-1] * 32 // in_features
    return bits


def _raw_rows(header: GGUFHeader, info: TensorInfo, rows: int):
    """The first `rows` rows of a tensor's bytes as stored, shape (rows, bytes per row)."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES

    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[info.type_name]]
    row_bytes = info.shape[-1] // block * block_bytes
    data = np.memmap(header.path, dtype=np.uint8, mode="r", offset=header.data_start + info.offset,
                     shape=(rows * row_bytes,))
    return np.array(data).reshape(rows, row_bytes)


def _read_bf16(header: GGUFHeader, info: TensorInfo):
    """A BF16 tensor, bit for bit (mx.load would narrow it to float16)."""
    import mlx.core as mx

    rows = info.shape[0] if len(info.shape) > 1 else 1
    raw = _raw_rows(header, info, rows).view("<u2").reshape(info.shape)
    return mx.array(raw).view(mx.bfloat16)


def check_decoding(header: GGUFHeader, weights: dict, rows: int = 4) -> None:
    """Compare mx.load's decoding of the first rows of one tensor per quantized type with the
    gguf package's reference decoder; raise if they disagree (an mlx bug, e.g. Q4_1 before
    ml-explore/mlx#3664 or Q4_K today)."""
    import mlx.core as mx
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    seen = set()
    for name, info in header.tensors.items():
        if info.type_name in FLOAT_TYPES or info.type_name in seen or len(info.shape) != 2:
            continue
        seen.add(info.type_name)
        n = min(rows, info.shape[0])
        expected = dequantize(_raw_rows(header, info, n), GGMLQuantizationType[info.type_name])
        base = name[: -len(".weight")]
        if f"{base}.scales" in weights:
            w, s, b = (weights[f"{base}.{k}"][:n] for k in ("weight", "scales", "biases"))
            bits = w.shape[-1] * 32 // (s.shape[-1] * GGUF_GROUP_SIZE)
            got = mx.dequantize(w, s, b, group_size=GGUF_GROUP_SIZE, bits=bits)
        else:
            got = weights[name][:n]
        got = np.array(got.astype(mx.float32))
        error = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")
        # float16 rounding of the decoded values stays near 1e-3 of the largest; a decoding bug is O(1) of it
        if not error <= 1e-2 * float(np.max(np.abs(expected))) + 1e-6:
            raise ValueError(f"{header.path}: mlx {getattr(mx, '__version__', '?')} decodes {info.type_name} tensors "
                             f"wrongly ({name}: max error {error:.3g} against the gguf package's decoder); "
                             f"upgrade mlx, or {ADVICE}")


def load_gguf(path: str | Path):
    """Load a llama-family GGUF as (mlx-lm llama Model, TokenizerWrapper, Hugging Face style config).

    Q4_0 / Q4_1 / Q8_0 tensors become nn.QuantizedLinear / nn.QuantizedEmbedding with their own
    blocks (group size 32); float tensors become plain weights. The config carries
    "quantization" (and "quantization_config") as mlx-lm writes them, so a saved copy reloads
    with mlx_lm.utils.load.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama

    header = read_header(path)
    path = header.path
    config = hf_config_from_header(header)
    unsupported = {n: i.type_name for n, i in header.tensors.items() if i.type_name not in SUPPORTED_TENSOR_TYPES}
    if unsupported:
        examples = ", ".join(f"{n} ({t})" for n, t in list(unsupported.items())[:3])
        raise ValueError(f"{path}: tensor types mlx cannot read: {examples}"
                         f"{' and more' if len(unsupported) > 3 else ''}; supported are "
                         f"{', '.join(SUPPORTED_TENSOR_TYPES)}. {ADVICE[0].upper()}{ADVICE[1:]}")
    try:
        weights = mx.load(str(path))
    except RuntimeError as err:
        raise ValueError(f"{path}: mlx could not read the tensors ({err}); {ADVICE}") from err
    check_decoding(header, weights)
    for name, info in header.tensors.items():
        if info.type_name == "BF16":
            weights[name] = _read_bf16(header, info)
    mapped = map_weights(weights, config, path)
    bits = quantized_bits(mapped)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    nn.quantize(model, class_predicate=lambda p, m: {"group_size": GGUF_GROUP_SIZE, "bits": bits[p]} if p in bits else False)
    try:
        model.load_weights(list(mapped.items()), strict=True)
    except ValueError as err:
        raise ValueError(f"{path}: the tensors do not fit a llama model with this metadata ({err})") from err
    mx.eval(model.parameters())
    float_types = {i.type_name for i in header.tensors.values() if len(i.shape) == 2} & {"BF16", "F16"}
    config["torch_dtype"] = "bfloat16" if "BF16" in float_types else "float16" if bits or float_types else "float32"
    if bits:
        default_bits = Counter(bits.values()).most_common(1)[0][0]
        quantization: dict[str, Any] = {"group_size": GGUF_GROUP_SIZE, "bits": default_bits, "mode": "affine"}
        # mlx-lm reads per-layer settings from here where they differ from the default (and the
        # layers left float need no entry: it quantizes only modules whose scales it finds)
        quantization.update({p: {"group_size": GGUF_GROUP_SIZE, "bits": b, "mode": "affine"}
                             for p, b in sorted(bits.items()) if b != default_bits})
        config["quantization"] = quantization
        config["quantization_config"] = dict(quantization)
    return model, load_gguf_tokenizer(path, header), config
