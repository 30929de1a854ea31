"""The tokenizer of a GGUF file, rebuilt from its metadata so that it splits text as llama.cpp does.

Byte-level BPE vocabularies (`tokenizer.ggml.model` 'gpt2': llama 3, Qwen 2, SmolLM2...) are
built here with `tokenizers`, with the pre-tokenizer llama.cpp uses for the file's
`tokenizer.ggml.pre` (SmolLM2's splits digits one by one). Other kinds (SentencePiece: Mistral,
Gemma, Phi-3) are built by transformers' GGUF tokenizer builders from our metadata, which needs no
PyTorch (its GGUF file reader does: older transformers fall back to it).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .gguf_file import GGUFHeader, read_header, required_key

# llama.cpp's pre-tokenizer (llama-vocab.cpp) for each `tokenizer.ggml.pre` of a byte-level BPE vocabulary.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    # "\p{N}" first, then the GPT-2 regex: every digit is a token of its own (SmolLM2, StarCoder...)
    "digits": ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
    "gpt2": ("gpt-2", "mpt", "olmo", "jais", "exaone4", "trillion", "granite-docling"),
    "llama3": ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"),
    "qwen2": ("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"),
}


def _pre_tokenizer_for(pre: str, header: GGUFHeader):
    from tokenizers import Regex, pre_tokenizers

    family = next((f for f, names in PRE_TOKENIZERS.items() if pre in names), None)
    if family is None:
        known = sorted(n for names in PRE_TOKENIZERS.values() for n in names)
        raise ValueError(f"{header.path}: tokenizer.ggml.pre is '{pre}', a pre-tokenizer we cannot reproduce, so the "
                         f"text would be split differently from llama.cpp (supported: {', '.join(known)}); "
                         "use the model's Hugging Face folder instead")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=family in ("digits", "gpt2"))
    if family == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if family == "gpt2":
        return byte_level
    regex = LLAMA3_REGEX if family == "llama3" else QWEN2_REGEX
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False), byte_level])


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level BPE vocabularies are spelled."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:  # control characters, space and a few others move past 255
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_tokenizer(header: GGUFHeader):
    """A byte-level BPE (`tokenizer.ggml.model` 'gpt2') rebuilt with `tokenizers` from the vocabulary and merges.

    Built here rather than by transformers, whose GGUF reader needs PyTorch (transformers 5),
    which the MLX install does not have.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    meta = header.metadata
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise ValueError(f"{header.path}: a byte-level BPE vocabulary without tokenizer.ggml.merges; "
                         "use the model's Hugging Face folder instead")
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    alphabet = byte_alphabet()
    spelled = set(alphabet.values())
    # Byte-level vocabularies spell every byte as a printable character; respell any token that is not.
    tokens = [t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                   merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
    backend.pre_tokenizer = _pre_tokenizer_for(meta.get("tokenizer.ggml.pre", "default"), header)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    # llama.cpp matches control (3) and user-defined (4) tokens whole in the text.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])

    def token_named(key: str) -> str | None:
        index = meta.get(key)
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    bos = token_named("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, int(meta["tokenizer.ggml.bos_token_id"]))]),
        ])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos,
                                   eos_token=token_named("tokenizer.ggml.eos_token_id"),
                                   unk_token=token_named("tokenizer.ggml.unknown_token_id"),
                                   pad_token=token_named("tokenizer.ggml.padding_token_id"))


def _transformers_tokenizer(header: GGUFHeader):
    """A non-byte-level vocabulary through transformers' GGUF tokenizer builders, fed our metadata."""
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            _SPECIAL_TOKENS, GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
    except ImportError:  # transformers before 5.x: its own GGUF reader (which needs PyTorch)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(header.path.parent), gguf_file=header.path.name)
    meta = header.metadata
    # transformers' get_gguf_tokenizer, on metadata we have already read
    grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    fields, settings = grouped["tokenizer"], grouped["tokenizer_config"]
    if fields.get("tokenizer_type") == "llama":
        settings.setdefault("add_bos_token", True)  # llama.cpp adds BOS to a SentencePiece vocabulary by default
    for name, key in _SPECIAL_TOKENS.items():
        index = meta.get(f"tokenizer.ggml.{key}")
        settings[name] = fields["tokens"][index] if index is not None else None
    backend, _ = convert_gguf_tokenizer(meta.get("general.architecture"), fields)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **settings)


def load_gguf_tokenizer(path: str | Path, header: GGUFHeader | None = None):
    """The tokenizer and chat template rebuilt from GGUF metadata, as an mlx-lm TokenizerWrapper.

    Byte-level BPE vocabularies (llama 3, Qwen 2, SmolLM2...) are rebuilt here, with the
    pre-tokenizer llama.cpp uses for the file's `tokenizer.ggml.pre`; other kinds (SentencePiece)
    by transformers' builders. Raises ValueError (one line) for a vocabulary neither can rebuild.
    """
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    header = header or read_header(path)
    path, meta = header.path, header.metadata
    model_type = required_key(header, "tokenizer.ggml.model")
    required_key(header, "tokenizer.ggml.tokens")
    if model_type == "gpt2":
        tokenizer = _byte_level_tokenizer(header)
    else:
        try:
            tokenizer = _transformers_tokenizer(header)
        except Exception as err:  # transformers raises many types for tokenizers it cannot rebuild
            hint = " (pip install torch: transformers needs it to read GGUF tokenizers)" \
                if importlib.util.find_spec("torch") is None else ""
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{path}: transformers could not rebuild the tokenizer from the GGUF metadata "
                             f"(tokenizer.ggml.model '{model_type}'){hint}: {reason}; use the model's Hugging "
                             "Face folder instead") from err
    if "tokenizer.chat_template" in meta:
        tokenizer.chat_template = meta["tokenizer.chat_template"]
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return TokenizerWrapper(tokenizer, eos_token_ids=[int(eos)] if eos is not None else None)
