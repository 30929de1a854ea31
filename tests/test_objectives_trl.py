"""DPO and ORPO on MLX against TRL's trainers on the same tiny model, adapter and batch.

One random llama (transformers) with one random PEFT adapter; MLX loads both (float base, the
chunked output-head loss on). TRL computes its loss on the same token batch with torch CPU:
in float32 for the loss comparison (< 1e-4 relative) and in float64 as the gradient reference.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("trl", reason="the TRL comparison needs the test extra: pip install -e '.[test]'")
torch = pytest.importorskip("torch", reason="the TRL comparison needs torch (the cuda or test extra)")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_lora.adapters import load_adapters  # noqa: E402
from mlx_lora.adapters.peft_format import mlx_key_to_peft  # noqa: E402
from mlx_lora.config import DataConfig, HF_TARGET_MODULES, TrainingConfig  # noqa: E402
from mlx_lora.loss import enable_chunked_loss  # noqa: E402
from mlx_lora.models import load_model  # noqa: E402
from mlx_lora.objectives import preference_loss, reference_logps  # noqa: E402
from mlx_lora.preference_data import collate_pairs, load_preference_split  # noqa: E402
from tiny_torch import make_torch_model_dir  # noqa: E402

LOSS_TOLERANCE = 1e-4  # relative, float32 (ours) against float32 (TRL)
GRAD_TOLERANCE = 2e-4  # relative (global norm of the difference), float32 against the float64 reference
ROWS = [
    {"prompt": "what is the capital of France?", "chosen": "Paris.", "rejected": "hello world"},
    {"prompt": "say fox", "chosen": "fox", "rejected": "The quick brown dog"},
    {"messages": [{"role": "system", "content": "answer"}, {"role": "user", "content": "date 0123"}],
     "chosen": [{"role": "assistant", "content": "2021-03-07"}], "rejected": "March 7, 2021"},
    {"prompt": "hello", "chosen": "world", "rejected": "world."},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base dir, PEFT adapter dir, tokens (2B, T), masks (2, 2B, T-1), nll-on-prompt masks)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("trl")
    base = make_torch_model_dir(root / "base")
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(HF_TARGET_MODULES), init_lora_weights=False,
                        task_type="CAUSAL_LM")
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), config)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.mul_(0.5)  # a visible but moderate change of the policy
    peft.save_pretrained(str(root / "peft"))
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    _, tokenizer, _ = load_model(str(base))
    batches = {}
    for on_prompt in (False, True):
        pairs = load_preference_split(root / "pairs.jsonl", tokenizer, DataConfig(path=str(root), train_on_prompt=on_prompt))
        batches[on_prompt] = collate_pairs(pairs, list(range(len(pairs))))
    return base, root / "peft", batches


def mlx_policy(base, peft_dir):
    model, _, _ = load_model(str(base))
    load_adapters(model, peft_dir)
    mx.eval(model.parameters())
    model.eval()
    tokens = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    assert enable_chunked_loss(model, tokens), "the chunked output-head path must be the one under test"
    return model


def mlx_loss_and_grads(model, tokens, masks, config):
    tokens, masks = mx.array(tokens), mx.array(masks)
    reference = reference_logps(model, tokens, masks[0]) if config.objective == "dpo" else None

    def objective(model):
        return preference_loss(model, tokens, masks, reference, config)

    (loss, metrics), grads = nn.value_and_grad(model, objective)(model)
    mx.eval(loss, metrics, grads)
    return loss.item(), {mlx_key_to_peft(k): np.array(v) for k, v in tree_flatten(grads)}, metrics


def torch_peft(base, peft_dir, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype), str(peft_dir),
                                      is_trainable=True)
    return model.train()  # no dropout in this adapter; train() as the trainers run


def peft_grads(model) -> dict:
    """Gradients by MLX key order: PEFT's (r, in) / (out, r) transposed to MLX's (in, r) / (r, out)."""
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            grads[name.replace(".default", "")] = param.grad.double().numpy().T
    return grads


def compare_grads(ours: dict, reference: dict) -> float:
    assert set(ours) == set(reference), sorted(set(ours) ^ set(reference))[:4]
    diff = np.sqrt(sum(((ours[k] - reference[k]) ** 2).sum() for k in ours))
    norm = np.sqrt(sum((reference[k] ** 2).sum() for k in ours))
    assert norm > 0
    return diff / norm


def trl_dpo_loss(base, peft_dir, tokens, masks, loss_type, beta, dtype, tmp_path):
    """TRL's DPOTrainer loss (and gradients) on our token batch, reference = adapter disabled."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model = torch_peft(base, peft_dir, dtype)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], report_to="none",
                     use_cpu=True, bf16=False, fp16=False, per_device_train_batch_size=len(tokens) // 2)
    dataset = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tokenizer)
    # TRL keeps a copy of an adapter it is given as the reference ("ref"); ours is always the base
    # (adapters off), which is TRL's reference for a new adapter. Drop the copy to compare like with like.
    if "ref" in trainer.model.peft_config:
        trainer.model.delete_adapter("ref")
    completion = np.concatenate([np.zeros((len(tokens), 1), np.float32), masks[0]], axis=1)
    lengths = [int(np.nonzero(row)[0].max()) + 1 for row in completion]  # right padding follows the last target
    attention = np.array([[1] * n + [0] * (tokens.shape[1] - n) for n in lengths])
    inputs = {"input_ids": torch.as_tensor(tokens, dtype=torch.long), "attention_mask": torch.as_tensor(attention),
              "completion_mask": torch.as_tensor(completion, dtype=torch.long)}
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    loss.backward()
    return loss.item(), peft_grads(trainer.model)


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("hinge", 0.5), ("ipo", 0.3)])
def test_dpo_loss_and_gradients_equal_trl(setup, tmp_path, loss_type, beta):
    base, peft_dir, batches = setup
    tokens, masks, _ = batches[False]
    config = TrainingConfig(objective="dpo", beta=beta, loss_type=loss_type)
    ours, grads, metrics = mlx_loss_and_grads(mlx_policy(base, peft_dir), tokens, masks, config)
    theirs, _ = trl_dpo_loss(base, peft_dir, tokens, masks, loss_type, beta, torch.float32, tmp_path)
    reference, reference_grads = trl_dpo_loss(base, peft_dir, tokens, masks, loss_type, beta, torch.float64, tmp_path)
    assert abs(metrics[0].item()) > 1e-3, "the adapter must move the rewards, or the test proves little"
    assert abs(ours - theirs) / abs(theirs) < LOSS_TOLERANCE, (ours, theirs)
    assert abs(ours - reference) / abs(reference) < LOSS_TOLERANCE
    assert compare_grads(grads, reference_grads) < GRAD_TOLERANCE


def trl_orpo_loss(base, peft_dir, tokens, masks, beta, dtype, tmp_path):
    """TRL's ORPOTrainer loss (and gradients) on our token batch (its NLL covers prompt and answer)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model = torch_peft(base, peft_dir, dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    args = ORPOConfig(output_dir=str(tmp_path / "orpo"), beta=beta, report_to="none", use_cpu=True,
                      bf16=False, fp16=False, max_length=64)
    dataset = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    trainer = ORPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    pairs = len(tokens) // 2
    real = masks[1] > 0  # every real token after the first (nll on prompt)
    lengths = [int(np.nonzero(row)[0].max()) + 2 for row in real]
    batch = {}
    for name, rows in (("chosen", slice(0, pairs)), ("rejected", slice(pairs, None))):
        ids = torch.as_tensor(tokens[rows], dtype=torch.long)
        attention = torch.as_tensor([[1] * n + [0] * (tokens.shape[1] - n) for n in lengths[rows]])
        labels = ids.clone()
        labels[:, 1:][torch.as_tensor(masks[0][rows]) == 0] = -100
        labels[:, 0] = -100
        batch.update({f"{name}_input_ids": ids, f"{name}_attention_mask": attention, f"{name}_labels": labels})
    trainer.model.train()
    loss, _ = trainer.get_batch_loss_metrics(trainer.model, batch)
    loss.backward()
    return loss.item(), peft_grads(trainer.model)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_loss_and_gradients_equal_trl(setup, tmp_path, beta):
    base, peft_dir, batches = setup
    tokens, masks, _ = batches[True]  # TRL's ORPO NLL covers the prompt: data.train_on_prompt: true
    config = TrainingConfig(objective="orpo", beta=beta)
    ours, grads, _ = mlx_loss_and_grads(mlx_policy(base, peft_dir), tokens, masks, config)
    theirs, _ = trl_orpo_loss(base, peft_dir, tokens, masks, beta, torch.float32, tmp_path)
    reference, reference_grads = trl_orpo_loss(base, peft_dir, tokens, masks, beta, torch.float64, tmp_path)
    assert abs(ours - theirs) / abs(theirs) < LOSS_TOLERANCE, (ours, theirs)
    assert abs(ours - reference) / abs(reference) < LOSS_TOLERANCE
    assert compare_grads(grads, reference_grads) < GRAD_TOLERANCE


@pytest.mark.parametrize("objective,loss_type", [("dpo", "sigmoid"), ("dpo", "ipo"), ("orpo", "sigmoid")])
def test_cuda_backend_losses_equal_trl(setup, tmp_path, objective, loss_type):
    """The CUDA backend's torch loop (cuda_objectives.py) on the same batch gives TRL's loss."""
    from mlx_lora.backends.cuda_objectives import preference_loss as torch_preference_loss

    base, peft_dir, batches = setup
    tokens, masks, _ = batches[objective == "orpo"]
    config = TrainingConfig(objective=objective, beta=0.2, loss_type=loss_type)
    model = torch_peft(base, peft_dir, torch.float32)
    ours, _ = torch_preference_loss(model, torch.as_tensor(tokens, dtype=torch.long), torch.as_tensor(masks), config)
    if objective == "dpo":
        theirs, _ = trl_dpo_loss(base, peft_dir, tokens, masks, loss_type, 0.2, torch.float32, tmp_path)
    else:
        theirs, _ = trl_orpo_loss(base, peft_dir, tokens, masks, 0.2, torch.float32, tmp_path)
    assert abs(ours.item() - theirs) / abs(theirs) < LOSS_TOLERANCE, (ours.item(), theirs)
