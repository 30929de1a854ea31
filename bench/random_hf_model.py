"""A Hugging Face model folder with a real model's config.json shape and random weights.

For checks that need a real-sized model where nothing can be downloaded (the CUDA backend on a
GPU machine, memory measurements): config.json from bench/model_configs, random bfloat16 weights
(transformers' own initialisation), and the tests' small byte-level BPE tokenizer with ChatML
(its ids are a prefix of the model's vocabulary; the rest of the embedding rows go unused).

    python bench/random_hf_model.py bench/model_configs/Qwen2.5-1.5B.json /tmp/qwen-1.5b [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="a config.json (e.g. bench/model_configs/Qwen2.5-1.5B.json)")
    parser.add_argument("out", type=Path, help="folder to write (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--device", default="cpu", help="where the random weights are made (cuda is faster for 7B+)")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tiny import make_tokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(args.out)
    settings = json.loads(args.config.read_text())
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    settings.update(eos_token_id=eos, bos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(**settings)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(args.out))
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {config.model_type}, {params / 1e9:.2f}B parameters, random bfloat16 weights")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
