"""Tiny random models and tokenizers for fast tests (a 2-block llama with a byte-level BPE)."""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Convert this date to ISO 8601 format: March 7, 2021 -> 2021-03-07",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "user assistant system hello world what is the capital of France? Paris.",
] * 20


def make_tokenizer(folder: Path, vocab_size: int = 400):
    """Train a small byte-level BPE with ChatML specials and save it as a HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHATML
    fast.save_pretrained(str(folder))
    return fast


def tiny_config(vocab_size: int, hidden_size: int = 64, layers: int = 2) -> dict:
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden_size,
        "num_hidden_layers": layers, "intermediate_size": 2 * hidden_size, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": vocab_size, "rope_theta": 10000.0,
        "max_position_embeddings": 512, "tie_word_embeddings": False, "torch_dtype": "float32",
        "eos_token_id": 2, "bos_token_id": None,
    }


def make_model_dir(folder: Path, seed: int = 0, layers: int = 2, hidden_size: int = 64) -> Path:
    """A Hugging Face-layout folder (config.json, model.safetensors, tokenizer) of a random tiny llama."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder)
    config = tiny_config(len(tokenizer), hidden_size, layers)
    config["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    # MLX's default init gives logits within about +-4, too flat to learn from in a few steps.
    weights["lm_head.weight"] = weights["lm_head.weight"] * 3
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def write_chat_split(folder: Path, rows: int = 24, seed: int = 0) -> Path:
    """train/valid/test.jsonl of a trivially learnable chat task (answer = the input reversed... simply copied)."""
    import random

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    words = ["fox", "dog", "Paris", "date", "hello", "world"]
    for split, n in (("train", rows), ("valid", max(4, rows // 4)), ("test", max(4, rows // 4))):
        with open(folder / f"{split}.jsonl", "w") as handle:
            for _ in range(n):
                word = rng.choice(words)
                row = {"messages": [{"role": "user", "content": f"say {word}"}, {"role": "assistant", "content": word}]}
                handle.write(json.dumps(row) + "\n")
    return folder
