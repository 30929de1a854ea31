"""The predicted peak of one training step, as named components in bytes.

Pure arithmetic on a `ModelShape` and the run's settings (no MLX calls), so it can run before
anything is loaded. The activation terms count the arrays MLX keeps from the forward pass for
the backward pass, per token and per block; their coefficients were counted from the block's
graph (mlx-lm's llama/qwen2/gemma2 blocks, this kit's LoRA, frozen products and chunked loss)
and checked against `mx.get_peak_memory()` on random models by `bench/bench_memory.py` (README).
"""

from __future__ import annotations

from dataclasses import dataclass

from .shape import ModelShape, gguf_tensor_bytes

GB = 1e9
FIXED_OVERHEAD_BYTES = 10e6  # MLX's own allocations during a step (measured: 7-10 MB on tiny models)
HEAD_CHUNK_LOGITS_BYTES = 2 * 1024 * 1024  # loss.CHUNK_LOGITS_BYTES: a chunk's float32 logits
HEAD_CHUNK_LIVE = 10  # a chunk's backward holds ~10 logits-sized arrays (loss.py)
ROW_CHUNK = 8192  # frozen_matmul.ROW_CHUNK: output rows dequantized at a time in very wide layers
DOUBLE_QUANT_BLOCK = 256  # quantize.py: absmax values quantized in blocks of 256


@dataclass(frozen=True)
class StepSettings:
    """The run settings that move the peak (taken from a Config by `plan.settings_of`)."""

    mode: str = "affine"  # none | affine | nf4
    bits: int = 4
    group_size: int = 64
    block_size: int = 64
    double_quant: bool = False
    rank: int = 8
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    num_layers: int = -1
    batch_size: int = 1
    seq_length: int = 512
    grad_accumulation: int = 1
    grad_checkpoint: bool = False
    dequantize_path: bool = True  # the CPU path: frozen layers dequantized one at a time for BLAS


def _affine_bytes(elements: float, bits: int, group: int, scale_bytes: int) -> float:
    """MLX affine storage: packed weights plus one scale and one bias per group."""
    return elements * bits / 8 + 2 * elements / group * scale_bytes


def _nf4_bytes(elements: float, block: int, double_quant: bool) -> float:
    """NF4: two weights per byte; float32 absmax per block, or (double quant) uint8 per block plus
    a float32 absmax per 256 blocks and a float32 offset (QLoRA, Dettmers et al. 2023, sec. 3)."""
    blocks = elements / block
    absmax = blocks + blocks / DOUBLE_QUANT_BLOCK * 4 + 4 if double_quant else blocks * 4
    return elements / 2 + absmax


def scale_bytes_of(shape: ModelShape, s: StepSettings) -> int:
    """Bytes per scale/bias as held: float32 on the CPU path (widened at load), else the checkpoint's."""
    return 4 if s.dequantize_path else shape.dtype_bytes


def activation_bytes(shape: ModelShape, s: StepSettings) -> int:
    """Bytes per activation element: the embedding's output dtype (float32 once scales are widened)."""
    quantized_embedding = shape.source_bits or shape.gguf_tensors is not None or s.mode == "affine"
    return 4 if quantized_embedding and s.dequantize_path else shape.dtype_bytes


def base_bytes(shape: ModelShape, s: StepSettings) -> float:
    """The frozen base as held during training: GGUF blocks, MLX 4/8-bit, NF4 (+ double quant) or float."""
    sb = scale_bytes_of(shape, s)
    small = (shape.layers * shape.norms_per_block + 1) * shape.hidden * shape.dtype_bytes
    small += shape.layers * sum(p.outputs for p in shape.projections() if p.bias) * shape.dtype_bytes
    if shape.gguf_tensors is not None:  # quantized tensors stay as stored; float matrices follow `mode`
        total = 0.0
        for _, type_name, elements, matrix in shape.gguf_tensors:
            stored = gguf_tensor_bytes(type_name, elements)
            if stored is not None:
                total += stored
            elif matrix and s.mode == "affine":
                total += _affine_bytes(elements, s.bits, s.group_size, sb)
            elif matrix and s.mode == "nf4" and elements != shape.vocab * shape.hidden:
                total += _nf4_bytes(elements, s.block_size, s.double_quant)
            else:
                total += elements * {"F16": 2, "BF16": 2}.get(type_name, 4)
        return total
    embed = shape.vocab * shape.hidden
    head = 0 if shape.tied else embed
    linears = shape.layers * shape.block_linear_params()
    if shape.source_bits:
        return _affine_bytes(embed + head + linears, shape.source_bits, shape.source_group, sb) + small
    if s.mode == "affine":
        return _affine_bytes(embed + head + linears, s.bits, s.group_size, sb) + small
    if s.mode == "nf4":  # embeddings and the output head stay float (QLoRA convention)
        return _nf4_bytes(linears, s.block_size, s.double_quant) + (embed + head) * shape.dtype_bytes + small
    return (embed + head + linears) * shape.dtype_bytes + small


def adapted_blocks(shape: ModelShape, s: StepSettings) -> int:
    return shape.layers if s.num_layers < 0 else min(s.num_layers, shape.layers)


def lora_parameters(shape: ModelShape, s: StepSettings) -> int:
    """Trainable parameters: rank x (in + out) per adapted projection per adapted block."""
    targets = set(s.target_modules)
    all_linear = "all-linear" in targets
    per_block = sum(s.rank * (p.inputs + p.outputs) for p in shape.projections() if all_linear or p.name in targets)
    return per_block * adapted_blocks(shape, s)


def block_saved_elements(shape: ModelShape, s: StepSettings) -> float:
    """Elements one block keeps for the backward pass, per token (attention scores apart).

    3 x hidden + 3 x intermediate (norm outputs and residuals; gate, up and their product),
    plus q/k/v again when they carry biases (qwen2) and two more hidden-sized norms (gemma2).
    Measured on llama and qwen2 shapes: 4450 and 3718 elements against 4608 and 3584 from this
    count (`bench/bench_memory.py --config-dir`, README).
    """
    d, f = shape.hidden, shape.intermediate
    extra = (shape.q_dim + 2 * shape.kv_dim) if shape.qkv_bias else 0
    return 3 * d + 3 * f + extra + (shape.norms_per_block - 2) * d


SAVED_SCORE_COPIES = 1.0  # the softmax output of each block waits for the backward pass
SAVED_SCORE_COPIES_SOFTCAP = 3.0  # gemma2: scores / cap, tanh and softmax (counted, not measured)
BACKWARD_SCORE_COPIES = 7.5  # one block's softmax backward at once (measured: 7.3-7.6 copies)


def score_elements(shape: ModelShape, s: StepSettings) -> float:
    """Elements of one block's attention scores: batch x heads x T x T."""
    return float(s.batch_size * shape.heads * s.seq_length * s.seq_length)


def head_working_bytes(shape: ModelShape, s: StepSettings) -> float:
    """The output head and loss at the start of the backward pass, in bytes.

    Chunked loss (loss.py): ~10 chunks' worth of float32 logits, the hidden states and their
    gradient, and on the CPU path the dequantized head (measured: one float32 copy of it).
    Soft-capped logits (gemma2) keep the plain loss: whole logits, softmax and gradient.
    """
    tokens = s.batch_size * s.seq_length
    if shape.logit_softcap:
        return 3.0 * tokens * shape.vocab * 4
    dequantized = shape.vocab * shape.hidden * 4 if s.dequantize_path and s.mode != "none" else 0
    return HEAD_CHUNK_LIVE * HEAD_CHUNK_LOGITS_BYTES + dequantized + 2 * tokens * shape.hidden * 4


def components(shape: ModelShape, s: StepSettings) -> dict[str, float]:
    """Named parts of the predicted training-step peak, in bytes; their sum is the peak.

    The peak comes during the backward pass with every block's saved activations alive, plus
    the larger of two working sets: the output head / loss, or one block's attention backward
    (the other is reported as 0). The dequantized layer (CPU path) is alive in either.
    """
    a = activation_bytes(shape, s)
    tokens = s.batch_size * s.seq_length
    trainable = lora_parameters(shape, s)
    # the gradient, and the running sum when micro-batches are accumulated
    grads = trainable * 4 * (2 if s.grad_accumulation > 1 else 1)
    per_block = block_saved_elements(shape, s) * tokens * a
    scores = score_elements(shape, s) * a
    saved_copies = SAVED_SCORE_COPIES_SOFTCAP if shape.attention_softcap else SAVED_SCORE_COPIES
    if s.grad_checkpoint:  # each block keeps its input; one block is recomputed at a time
        activations = shape.layers * tokens * shape.hidden * a + per_block
        saved_scores = saved_copies * scores
    else:
        activations = shape.layers * per_block
        saved_scores = shape.layers * saved_copies * scores
    head = head_working_bytes(shape, s)
    attention_backward = BACKWARD_SCORE_COPIES * scores
    transient = 0.0
    if s.dequantize_path and s.mode != "none":
        widest = max(p.inputs * min(p.outputs, ROW_CHUNK) for p in shape.projections())
        transient = 2.0 * widest * 4  # the forward and backward copies may overlap
    return {
        "frozen base": base_bytes(shape, s),
        "LoRA parameters": trainable * 4.0,
        "AdamW state": trainable * 8.0,
        "gradients": float(grads),
        "activations": float(activations),
        "attention scores": float(saved_scores + (attention_backward if attention_backward > head else 0.0)),
        "output head / loss": float(head if head >= attention_backward else 0.0),
        "dequantized layer": float(transient),
        "fixed overhead": FIXED_OVERHEAD_BYTES,
    }


def kv_cache_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """Bytes of KV cache one token holds in every layer: keys and values, (kv_heads, head_dim) each.

    2 * layers * kv_heads * head_dim * dtype_bytes (the usual KV-cache size formula, e.g. in vLLM's
    block manager). Models with sliding-window layers (gemma2/3) keep less; this is an upper bound.
    """
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype_bytes
