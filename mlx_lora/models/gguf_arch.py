"""GGUF architectures: a file's metadata as a Hugging Face `config.json`, and what llama.cpp's
converter did to each family's tensors that loading must undo.

One entry per `general.architecture` in ARCHITECTURES. The metadata keys and the tensor
transforms come from llama.cpp's `convert_hf_to_gguf.py` (LlamaModel permutes Q/K rows for its
rope layout; the Gemma converters store RMSNorm weights plus one) and from `src/llama-model.cpp`
for values the file does not carry (Gemma's attention scale and Gemma 3's local rope base and
sliding-window pattern). Tensor names are mapped by the gguf package's `TensorNameMap` (in
`gguf.py`), so this module holds no name tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .gguf_file import GGUFHeader, read_float_tensor, required_key

HF_FOLDER_ADVICE = "use the model's Hugging Face folder (or its hub id) instead"


def _as_float32_text(x: float) -> float:
    """GGUF stores floats in 32 bits: 1e-5 reads back as 9.99999974e-06; give the value that was meant."""
    return float(f"{x:.7g}")


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one llama.cpp architecture maps onto an mlx-lm / Hugging Face model."""

    name: str  # general.architecture
    model_type: str  # mlx-lm module / HF model_type
    hf_class: str  # config.json "architectures"
    permute_qk: bool = False  # llama.cpp permuted Q and K rows (LlamaModel.modify_tensors)
    norm_shift: float = 0.0  # llama.cpp stored RMSNorm weights + this (Gemma: 1.0)
    extra: Callable[[GGUFHeader, dict], None] | None = None  # family-specific config fields


def _llama_rope(header: GGUFHeader, config: dict) -> None:
    """Llama 3.1-style scaling arrives as a `rope_freqs` tensor of per-dimension factors;
    find the llama3 rope_scaling that produces exactly those factors."""
    if "rope_freqs.weight" not in header.tensors:
        return
    import numpy as np

    factors = read_float_tensor(header, "rope_freqs.weight").astype(np.float64)
    dims, base = config["head_dim"], config["rope_theta"]
    freqs = base ** (np.arange(0, dims, 2) / dims)
    wavelens = 2 * math.pi * freqs
    factor = float(factors.max())
    for original in [8192] + [2 ** k for k in range(4, 21) if k != 13]:  # 8192 first: Llama 3.1 / 3.2
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 8.0)):
            # transformers' _compute_llama3_parameters, as factors on the wavelength
            low_wl, high_wl = original / low, original / high
            smooth = (original / wavelens - low) / (high - low)
            expected = np.where(wavelens < high_wl, 1.0,
                                np.where(wavelens > low_wl, factor, 1.0 / ((1 - smooth) / factor + smooth)))
            if np.allclose(expected, factors, rtol=1e-4):
                config["rope_scaling"] = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                                          "high_freq_factor": high, "original_max_position_embeddings": original}
                return
    raise ValueError(f"{header.path}: its rope_freqs factors match no Llama 3 rope scaling we know; {HF_FOLDER_ADVICE}")


def _qwen2(header: GGUFHeader, config: dict) -> None:
    config["use_sliding_window"] = False


def _gemma2(header: GGUFHeader, config: dict) -> None:
    meta, arch = header.metadata, "gemma2"
    config["attn_logit_softcapping"] = _as_float32_text(meta.get(f"{arch}.attn_logit_softcapping", 50.0))
    config["final_logit_softcapping"] = _as_float32_text(meta.get(f"{arch}.final_logit_softcapping", 30.0))
    config["sliding_window"] = int(meta.get(f"{arch}.attention.sliding_window", 4096))
    # llama-model.cpp: the 27B (46 blocks) scales queries by 1/sqrt(hidden/heads), the others by 1/sqrt(head_dim)
    big = config["num_hidden_layers"] == 46
    config["query_pre_attn_scalar"] = (config["hidden_size"] // config["num_attention_heads"]) if big else config["head_dim"]
    config["hidden_activation"] = "gelu_pytorch_tanh"


def _gemma3(header: GGUFHeader, config: dict) -> None:
    meta = header.metadata
    config["sliding_window"] = int(meta.get("gemma3.attention.sliding_window", 4096))
    config["sliding_window_pattern"] = 6  # llama-model.cpp: set_swa_pattern(6)
    config["rope_local_base_freq"] = 10000.0  # llama-model.cpp: freq_base_train_swa
    config["final_logit_softcapping"] = None
    config["attn_logit_softcapping"] = None
    big = config["num_hidden_layers"] == 62  # the 27B, as llama-model.cpp decides its attention scale
    config["query_pre_attn_scalar"] = (config["hidden_size"] // config["num_attention_heads"]) if big else config["head_dim"]
    config["hidden_activation"] = "gelu_pytorch_tanh"


def _phi3(header: GGUFHeader, config: dict) -> None:
    """Phi-3.5 style long-context rope: factor tensors rope_factors_long / rope_factors_short."""
    if "rope_factors_long.weight" not in header.tensors:
        return
    config["rope_scaling"] = {
        "type": "longrope",
        "long_factor": read_float_tensor(header, "rope_factors_long.weight").tolist(),
        "short_factor": read_float_tensor(header, "rope_factors_short.weight").tolist(),
    }
    original = header.metadata.get("phi3.rope.scaling.original_context_length")
    if original:
        config["original_max_position_embeddings"] = int(original)


_LLAMA = dict(model_type="llama", hf_class="LlamaForCausalLM", permute_qk=True, extra=_llama_rope)
ARCHITECTURES: dict[str, GGUFArchitecture] = {a.name: a for a in (
    GGUFArchitecture("llama", **_LLAMA),  # Llama 2/3.x, SmolLM, and Mistral 7B (llama.cpp writes it as llama)
    GGUFArchitecture("mistral", **_LLAMA),
    GGUFArchitecture("qwen2", "qwen2", "Qwen2ForCausalLM", extra=_qwen2),
    GGUFArchitecture("qwen3", "qwen3", "Qwen3ForCausalLM"),
    GGUFArchitecture("gemma2", "gemma2", "Gemma2ForCausalLM", norm_shift=1.0, extra=_gemma2),
    GGUFArchitecture("gemma3", "gemma3_text", "Gemma3ForCausalLM", norm_shift=1.0, extra=_gemma3),
    GGUFArchitecture("phi3", "phi3", "Phi3ForCausalLM", extra=_phi3),
)}
# Tensors that carry rope settings rather than weights; read into the config above.
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def architecture_of(header: GGUFHeader) -> GGUFArchitecture:
    """The ARCHITECTURES entry of a file; ValueError naming the supported ones otherwise."""
    name = required_key(header, "general.architecture")
    if name not in ARCHITECTURES:
        raise ValueError(f"{header.path}: general.architecture is '{name}', which mlx-lora cannot load from GGUF "
                         f"(supported: {', '.join(ARCHITECTURES)}); {HF_FOLDER_ADVICE}")
    return ARCHITECTURES[name]


def hf_config_from_header(header: GGUFHeader) -> dict:
    """A Hugging Face style config.json for the file's architecture (hyper-parameters, rope, tying)."""
    meta, path = header.metadata, header.path
    arch = architecture_of(header)
    key = arch.name
    if "token_embd.weight" not in header.tensors:
        raise ValueError(f"{path}: the file has no token_embd.weight tensor; it is incomplete")
    heads = int(required_key(header, f"{key}.attention.head_count"))
    hidden = int(required_key(header, f"{key}.embedding_length"))
    head_dim = int(meta.get(f"{key}.attention.key_length", hidden // heads))
    rope_dims = int(meta.get(f"{key}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(f"{path}: {key}.rope.dimension_count is {rope_dims} but the head size is {head_dim}; "
                         f"partial rotary embeddings are not supported from GGUF; {HF_FOLDER_ADVICE}")
    kv_heads = meta.get(f"{key}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer counts (some newer files): one value is all mlx-lm can take
        if len(set(kv_heads)) != 1:
            raise ValueError(f"{path}: per-layer key/value head counts are not supported; {HF_FOLDER_ADVICE}")
        kv_heads = kv_heads[0]
    config = {
        "model_type": arch.model_type,
        "architectures": [arch.hf_class],
        "hidden_size": hidden,
        "num_hidden_layers": int(required_key(header, f"{key}.block_count")),
        "intermediate_size": int(required_key(header, f"{key}.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": _as_float32_text(required_key(header, f"{key}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _as_float32_text(meta.get(f"{key}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(f"{key}.context_length", 2048)),
        # the embedding's row count, not the metadata's, is what the weights need
        "vocab_size": int(header.tensors["token_embd.weight"].shape[0]),
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "attention_bias": "blk.0.attn_q.bias" in header.tensors,
        "mlp_bias": False,
    }
    for name, field in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        if field in meta:
            config[name] = int(meta[field])
    scaling = meta.get(f"{key}.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear",
                                  "factor": _as_float32_text(required_key(header, f"{key}.rope.scaling.factor"))}
    elif scaling not in ("none", "longrope"):
        raise ValueError(f"{path}: {key}.rope.scaling.type '{scaling}' is not supported from GGUF "
                         f"(none, linear, llama3 factors and Phi-3 longrope are); {HF_FOLDER_ADVICE}")
    if arch.extra:
        arch.extra(header, config)
    return config
