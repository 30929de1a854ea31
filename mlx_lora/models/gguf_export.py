"""GGUF export of a fused float model (f16), for Ollama and llama.cpp users.

Reading GGUF files is `gguf.py`; this is the other direction, for every architecture in
`gguf_arch.ARCHITECTURES`: mlx-lm tensor names become llama.cpp's (the gguf package's
TensorNameMap), Q/K rows get llama.cpp's rope permutation back (llama), Gemma's norms their +1,
and the metadata keys are those `gguf_arch.hf_config_from_header` reads. The tokenizer and chat
template are copied from the source GGUF when there is one (or rebuilt from tokenizer.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .gguf_arch import ARCHITECTURES

# HF model_type -> GGUF general.architecture
EXPORT_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                        "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3", "phi3": "phi3"}
# encode(gguf_name, float32 array) -> (raw bytes as a uint8 array, GGMLQuantizationType) or None to keep float
TensorEncoder = Callable[[str, "object"], "tuple | None"]


def permute_rows(w, n_heads: int):
    """llama.cpp's rope row permutation (HF -> GGUF) on the (rows, ...) weight of Q or K."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    # HF rows are (head, pair, half); GGUF wants (head, half, pair). Inverse of gguf.unpermute_rows.
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export_architecture(config: dict) -> str:
    """The GGUF architecture name for a config; ValueError naming the exportable ones otherwise."""
    arch = EXPORT_ARCHITECTURES.get(config.get("model_type", ""))
    if arch is None:
        raise ValueError(f"--gguf: model_type {config.get('model_type')!r} has no GGUF export here (exportable: "
                         f"{', '.join(sorted(EXPORT_ARCHITECTURES))}); keep the Hugging Face folder")
    if arch == "gemma3":  # llama.cpp's gemma3 fixes the pattern (llama-model.cpp: set_swa_pattern(6))
        from .sources import sliding_window_pattern

        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        pattern = text.get("sliding_window_pattern") or (
            sliding_window_pattern(text["layer_types"], int(text.get("num_hidden_layers") or 0))
            if isinstance(text.get("layer_types"), list) else 6)
        if pattern != 6:
            raise ValueError(f"--gguf: this Gemma 3 alternates sliding and full attention every {pattern} layers; "
                             "llama.cpp runs Gemma 3 with a pattern of 6 only, so its GGUF would compute differently; "
                             "keep the Hugging Face folder")
    return arch


def gguf_tensors(model, config: dict) -> dict:
    """GGUF name -> float32 numpy array, in llama.cpp's layout (names, Q/K row order, norm offsets)."""
    import gguf
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    arch = ARCHITECTURES[export_architecture(config)]
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch.name)
    table = gguf.get_tensor_name_map(arch_enum, int(config["num_hidden_layers"]))
    tensors = {}
    for key, value in tree_flatten(model.parameters()):
        module, _, leaf = key.rpartition(".")
        gguf_module = table.get_name(module)
        if gguf_module is None:
            raise ValueError(f"--gguf: parameter {key} has no GGUF name for {arch.name}")
        value = np.array(value.astype(mx.float32))
        if arch.permute_qk and module.endswith(("q_proj", "k_proj")) and leaf == "weight":
            value = permute_rows(value, config["num_attention_heads"] if module.endswith("q_proj")
                                 else config["num_key_value_heads"])
        if arch.norm_shift and module.endswith("norm"):
            value = value + arch.norm_shift
        tensors[f"{gguf_module}.{leaf}"] = value
    return tensors


def _write_metadata(writer, arch: str, config: dict) -> dict:
    """The hyper-parameters `hf_config_from_header` reads back; returns extra tensors (rope factors)."""
    import numpy as np
    from gguf import RopeScalingType

    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_vocab_size(int(config["vocab_size"]))
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(float(config.get("attn_logit_softcapping") or 50.0))
        writer.add_final_logit_softcapping(float(config.get("final_logit_softcapping") or 30.0))
    if arch in ("gemma2", "gemma3") and config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
    extra = {}
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "llama3":  # llama.cpp's converter writes the per-dimension factors as a tensor
        factor, low, high = float(scaling["factor"]), float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        original = float(scaling.get("original_max_position_embeddings", 8192))
        wavelens = 2 * np.pi * float(config.get("rope_theta", 10000.0)) ** (np.arange(0, head_dim, 2) / head_dim)
        smooth = (original / wavelens - low) / (high - low)
        extra["rope_freqs.weight"] = np.where(wavelens < original / high, 1.0, np.where(
            wavelens > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth))).astype(np.float32)
    elif kind == "longrope":
        extra["rope_factors_long.weight"] = np.array(scaling["long_factor"], np.float32)
        extra["rope_factors_short.weight"] = np.array(scaling["short_factor"], np.float32)
        if config.get("original_max_position_embeddings"):
            writer.add_key_value(f"{arch}.rope.scaling.original_context_length",
                                 int(config["original_max_position_embeddings"]), _uint32())
    elif kind not in (None, "default"):
        raise ValueError(f"--gguf: rope scaling {kind!r} has no GGUF export here")
    return extra


def _uint32():
    from gguf import GGUFValueType

    return GGUFValueType.UINT32


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


def tokenizer_spec(tokenizer) -> dict:
    """The tokenizer.json of a Hugging Face fast tokenizer (or mlx-lm's wrapper of one), checked to be
    one this export writes (byte-level BPE with a pre-tokenizer llama.cpp can name); ValueError otherwise.
    `fuse --gguf` calls it before any work."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's TokenizerWrapper holds the transformers one
    spec = json.loads((hf if hasattr(hf, "backend_tokenizer") else tokenizer).backend_tokenizer.to_str())
    if spec.get("model", {}).get("type") != "BPE":
        raise ValueError(f"--gguf: tokenizer model {spec.get('model', {}).get('type')!r} cannot be exported; "
                         "only byte-level BPE tokenizers (or a GGUF source model) are supported")
    llama_cpp_pre(spec)
    return spec


def _write_bpe_tokenizer(writer, tokenizer) -> None:
    """Byte-level BPE vocabulary and merges from a Hugging Face tokenizer.json (the gpt2 model of llama.cpp)."""
    from gguf import TokenType

    spec = tokenizer_spec(tokenizer)
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
    writer.add_tokenizer_pre(llama_cpp_pre(spec))
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(int(tokenizer.eos_token_id))
    if getattr(tokenizer, "bos_token_id", None) is not None:
        writer.add_bos_token_id(int(tokenizer.bos_token_id))
    if getattr(tokenizer, "pad_token_id", None) is not None:
        writer.add_pad_token_id(int(tokenizer.pad_token_id))
    bos = getattr(tokenizer, "bos_token_id", None)
    writer.add_add_bos_token(bos is not None and list(tokenizer.encode("a"))[:1] == [bos])  # as the tokenizer does
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


# Texts whose tokens must come back the same from the written GGUF: digits, contractions, spaces,
# newlines and tabs, accents, CJK and an emoji, where pre-tokenizers differ.
ROUND_TRIP_TEXTS = ("Hello world! It's 2024-12-02: 12 + 27 = 39.", "\n\n    indented\ttab  two  spaces\n",
                    "café naïve 東京 🙂 don't WE'LL", "x=1234567;y=0.5")


def llama_cpp_pre(spec: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for the pre-tokenizer of a tokenizer.json (`spec`), as
    `gguf_tokenizer.PRE_TOKENIZERS` reads it back: gpt-2, smollm (digits apart), llama-bpe, qwen2.
    Raises ValueError (one line) for a SentencePiece-style tokenizer or a pre-tokenizer without a name."""
    from .gguf_tokenizer import LLAMA3_REGEX, QWEN2_REGEX

    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [part.get("type") for part in parts]
    if "ByteLevel" not in kinds:
        raise ValueError("--gguf: this tokenizer is SentencePiece-style ('▁' for spaces, as Mistral, Llama 2, Gemma "
                         "and Phi-3 have), which this export cannot write; convert the fused folder with llama.cpp's "
                         "convert_hf_to_gguf.py instead")
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex == LLAMA3_REGEX:
            return "llama-bpe"
        if regex == QWEN2_REGEX:
            return "qwen2"
    raise ValueError(f"--gguf: this tokenizer's pre-tokenizer ({', '.join(map(str, kinds))}) has no llama.cpp name this "
                     "export knows (gpt-2, smollm, llama-bpe, qwen2), so llama.cpp would split text differently; "
                     "convert the fused folder with llama.cpp's convert_hf_to_gguf.py instead")


def check_round_trip(path: Path, tokenizer) -> None:
    """Raise ValueError when the GGUF at `path` tokenizes ROUND_TRIP_TEXTS unlike `tokenizer`."""
    from .gguf_tokenizer import load_gguf_tokenizer

    written = load_gguf_tokenizer(path)
    for text in ROUND_TRIP_TEXTS:
        want = list(tokenizer.encode(text, add_special_tokens=False))
        got = list(written.encode(text, add_special_tokens=False))
        if got != want:
            raise ValueError(f"--gguf: the written tokenizer splits {text!r} into {len(got)} tokens where the model's "
                             f"splits it into {len(want)}; no GGUF was kept")


def export_gguf(path: Path, model, config: dict, tokenizer, source_gguf: Path | None = None,
                encode: TensorEncoder | None = None) -> Path:
    """Write a float model as a GGUF file for llama.cpp / Ollama: matrices f16, vectors f32.

    `encode` may turn a tensor into raw blocks of another GGML type (tests write K-quant files
    this way). Raises ValueError for an architecture or rope scaling with no GGUF form.
    """
    import numpy as np
    from gguf import GGUFWriter, LlamaFileType

    arch = export_architecture(config)
    tensors = gguf_tensors(model, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), arch)
    writer.add_name(str(config.get("_name_or_path", "mlx-lora fused model")))
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    tensors.update(_write_metadata(writer, arch, config))
    if source_gguf is not None:
        _copy_tokenizer_fields(writer, source_gguf)
    else:
        _write_bpe_tokenizer(writer, tokenizer)
    for name, array in tensors.items():
        encoded = encode(name, array) if encode is not None and array.ndim == 2 else None
        if encoded is not None and encoded[1].name in ("F32", "F16"):
            writer.add_tensor(name, array.astype(np.float32 if encoded[1].name == "F32" else np.float16))
        elif encoded is not None:
            raw, kind = encoded
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=kind)
        else:
            writer.add_tensor(name, array.astype(np.float16 if array.ndim == 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if source_gguf is None:
        try:
            check_round_trip(path, tokenizer)
        except Exception:
            path.unlink(missing_ok=True)
            raise
    return path
