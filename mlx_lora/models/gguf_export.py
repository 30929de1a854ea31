"""GGUF export of a fused float model (llama family, f16), for Ollama and llama.cpp users.

Reading GGUF files is `gguf.py`; this is the other direction: mlx-lm tensor names become
llama.cpp's, Q/K rows get llama.cpp's rope permutation back, and the tokenizer and chat template
are copied from the source GGUF when there is one (or rebuilt from tokenizer.json otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

# mlx-lm llama module names -> llama.cpp GGUF tensor names.
GGUF_BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
GGUF_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def permute_rows(w, n_heads: int):
    """llama.cpp's rope row permutation (HF -> GGUF) on the (rows, ...) weight of Q or K."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    # HF rows are (head, pair, half); GGUF wants (head, half, pair). Inverse of gguf.unpermute_rows.
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_name(key: str) -> str:
    """mlx-lm llama parameter key -> GGUF tensor name (e.g. model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight)."""
    module, _, leaf = key.rpartition(".")
    if module.startswith("model.layers."):
        _, _, index, part = module.split(".", 3)
        if part in GGUF_BLOCK_NAMES:
            return f"blk.{index}.{GGUF_BLOCK_NAMES[part]}.{leaf}"
    elif module in GGUF_TOP_NAMES:
        return f"{GGUF_TOP_NAMES[module]}.{leaf}"
    raise ValueError(f"--gguf: parameter {key} has no GGUF name; only llama-family models export")


def gguf_tensors(model, config: dict) -> dict:
    """GGUF name -> numpy array (float16 matrices, float32 vectors as llama.cpp expects)."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    tensors = {}
    for key, value in tree_flatten(model.parameters()):
        name = gguf_tensor_name(key)
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config["num_attention_heads"] if ".attn_q." in name else config["num_key_value_heads"]
            value = permute_rows(value, heads)
        dtype = mx.float16 if value.ndim == 2 else mx.float32
        tensors[name] = np.array(value.astype(dtype))
    return tensors


def _copy_tokenizer_fields(writer, source_gguf: Path) -> None:
    """Copy every `tokenizer.*` field of the source GGUF verbatim (vocab, merges, pre, template)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(source_gguf))
    for key, fld in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = fld.contents()
        if fld.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=fld.types[-1])
        else:
            writer.add_key_value(key, value, fld.types[0])


def _write_bpe_tokenizer(writer, tokenizer) -> None:
    """Byte-level BPE vocabulary and merges from a Hugging Face tokenizer.json (the gpt2 model of llama.cpp)."""
    from gguf import TokenType

    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    spec = json.loads(hf.backend_tokenizer.to_str())
    if spec.get("model", {}).get("type") != "BPE":
        raise ValueError(f"--gguf: tokenizer model {spec.get('model', {}).get('type')!r} cannot be exported; "
                         "only byte-level BPE tokenizers (or a GGUF source model) are supported")
    vocab = dict(spec["model"]["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, token in added.items():
        vocab.setdefault(content, token["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [TokenType.UNUSED] * size
    for content, index in vocab.items():
        tokens[index] = content
        special = added.get(content, {}).get("special")
        types[index] = TokenType.CONTROL if special else TokenType.USER_DEFINED if content in added else TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(int(tokenizer.eos_token_id))
    if getattr(tokenizer, "bos_token_id", None) is not None:
        writer.add_bos_token_id(int(tokenizer.bos_token_id))
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def export_gguf(path: Path, model, config: dict, tokenizer, source_gguf: Path | None = None) -> Path:
    """Write the float model as an f16 GGUF file for llama.cpp / Ollama (llama family only)."""
    from gguf import GGUFWriter, LlamaFileType

    if config.get("model_type") not in ("llama", "mistral"):
        raise ValueError(f"--gguf: model_type {config.get('model_type')!r} is not supported; only the llama family exports")
    if config.get("rope_scaling") and config["rope_scaling"].get("type", config["rope_scaling"].get("rope_type")) not in ("linear", None):
        raise ValueError("--gguf: this model's rope scaling is not supported by the exporter")
    path.parent.mkdir(parents=True, exist_ok=True)
    heads = config["num_attention_heads"]
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(str(config.get("_name_or_path", "mlx-lora fused model")))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads", heads)))
    writer.add_rope_dimension_count(int(config.get("head_dim") or config["hidden_size"] // heads))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    if config.get("rope_scaling"):
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config["rope_scaling"]["factor"]))
    if source_gguf is not None:
        _copy_tokenizer_fields(writer, source_gguf)
    else:
        _write_bpe_tokenizer(writer, tokenizer)
    for name, array in gguf_tensors(model, config).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
