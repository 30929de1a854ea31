"""A tiny random llama built with transformers (torch), saved as a Hugging Face folder MLX loads too.

Shapes are chosen so that both square (q_proj, o_proj: 64 x 64) and rectangular (k_proj,
v_proj: 64 -> 32; gate/up: 64 -> 128; down: 128 -> 64) projections are present: a transpose
missed on a square matrix still loads, so only output comparisons catch it.
"""

from __future__ import annotations

from pathlib import Path

from tiny import make_tokenizer

HIDDEN = 64
HEADS = 4  # head_dim 16, so q_proj is 64 x 64 (square)
KV_HEADS = 2  # k_proj and v_proj are 64 -> 32


def make_torch_model_dir(folder: Path, seed: int = 0, layers: int = 2, hidden: int = HIDDEN) -> Path:
    """config.json + model.safetensors (float32) + tokenizer of a random LlamaForCausalLM."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=eos, bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
        # The default 0.02 gives nearly uniform logits: too flat to learn from in a few steps,
        # and too small for logit comparisons to see an adapter's effect.
        initializer_range=0.15,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(folder))
    return folder


# One tiny config per architecture family, with each family's real config.json quirks: Qwen2's
# q/k/v biases, Qwen3's q/k norms and explicit head_dim, Gemma's tied head, norms stored minus
# one, soft-capping, query scale and sliding window (wider than any test sequence: mlx-lm's Gemma 2
# has no sliding window), Gemma 3's local/global layer pattern, Phi-3's fused qkv / gate_up.
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    # head_dim 256 as in gemma-2-9b: transformers' GGUF reader (the reference) assumes query_pre_attn_scalar 256
    "gemma2": ("Gemma2Config", {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 256,
                                "tie_word_embeddings": True}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 256,
                                         "num_hidden_layers": 6, "tie_word_embeddings": True}),
    "phi3": ("Phi3Config", {}),
}


def make_family_dir(folder: Path, family: str, seed: int = 0, overrides: dict | None = None) -> Path:
    """config.json + model.safetensors (float32) + tokenizer of a random model of `family` (FAMILIES),
    with `overrides` on top of the family's settings."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder)
    class_name, extra = FAMILIES[family]
    settings = dict(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                    num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
                    rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                    bos_token_id=None, pad_token_id=tokenizer.pad_token_id, initializer_range=0.15)
    config = getattr(transformers, class_name)(**{**settings, **extra, **(overrides or {})})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32)
    with torch.no_grad():  # random norm weights and biases, so a mis-mapped one cannot hide behind ones / zeros
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(str(folder))
    return folder
