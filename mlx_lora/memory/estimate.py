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
from .sizes import GB

FIXED_OVERHEAD_BYTES = 10e6  # MLX's own allocations during a step (measured: 7-10 MB on tiny models)
HEAD_CHUNK_LOGITS_BYTES = 2 * 1024 * 1024  # loss.CHUNK_LOGITS_BYTES: a chunk's float32 logits
HEAD_CHUNK_LIVE = 10  # a chunk's backward holds ~10 logits-sized arrays (loss.py)
# A float head (float32 copies, or an unquantized base) on the CPU: its chunks have no dequantize to
# wait on, and MLX's CPU backend allocates each output when the op is queued, so ~12.5 chunks' logits
# are allocated ahead of the running one (measured 12.4-12.6, compiled value_and_grad of
# loss.chunked_cross_entropy, 1,024-4,096 positions, 8k and 49k rows). A memory limit (the guard's)
# throttles this run-ahead; the planner counts the unthrottled peak.
HEAD_CHUNK_LIVE_FLOAT_CPU = 12.5
# A dequantized head (CPU path): ~7.5 chunks' float32 rows are allocated ahead of the running one
# (loss.CHUNK_WEIGHT_BYTES; measured 7.4-7.6 on SmolLM2's head at 64-1,024 positions, 512-2,048 rows).
HEAD_DEQUANTIZED_CHUNKS_LIVE = 8
HEAD_CHUNK_WEIGHT_BYTES = 4 * 1024 * 1024  # loss.CHUNK_WEIGHT_BYTES
ROW_CHUNK = 8192  # frozen_matmul.ROW_CHUNK: output rows dequantized at a time in very wide layers
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
DOUBLE_QUANT_BLOCK = 256  # quantize.py: absmax values quantized in blocks of 256
# dpo / orpo: a batch of B pairs is one (2B, T) forward and backward, chosen rows then rejected
# (preference_data.collate_pairs), so every per-sequence term counts 2 sequences per example.
SEQUENCES_PER_EXAMPLE = {"sft": 1, "dpo": 2, "orpo": 2}
REFERENCE_COMPONENT = "dpo reference"  # the component only dpo has (see `sequences`)


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
    float_weights: bool = False  # CPU path: float32 copies of the quantized weights kept for the run
    objective: str = "sft"  # training.objective: dpo / orpo put each pair's two answers through the model
    cpu_streams: int = 1  # row groups run side by side on CPU streams (cpu_streams.stream_count)


def sequences(s: StepSettings) -> int:
    """Sequences one micro-batch puts through the model: `batch_size` examples for sft, twice
    that for dpo / orpo (each pair's chosen and rejected answer in one (2B, T) batch).

    DPO's reference log-probabilities (adapters off, no gradient) are evaluated in a pass of
    their own before the step (train.py), so that pass's activations are freed before the
    policy's forward begins and only its (2B,) float32 result is alive at the step's peak: that
    is all `components` counts for it. Measured on the test shape (tests/test_memory_plan.py:
    4 blocks, hidden 256, vocabulary 8,192, 512 tokens, compiled, CPU): DPO at 2 pairs peaked
    at 271.2 MB, ORPO at 270.2 MB, SFT at 4 examples at 269.4 MB.
    """
    return s.batch_size * SEQUENCES_PER_EXAMPLE.get(s.objective, 1)


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


def quantized_elements(shape: ModelShape, s: StepSettings) -> float:
    """Weights held quantized during training (the ones `training.float_weights` copies to float32).

    GGUF: every quantized tensor, plus float matrices the run quantizes; MLX 4/8-bit and affine:
    embedding, head and block linears; NF4: the block linears (embeddings stay float).
    """
    if shape.gguf_tensors is not None:
        total = 0.0
        for _, type_name, elements, matrix in shape.gguf_tensors:
            if gguf_tensor_bytes(type_name, elements) is not None:
                total += elements
            elif matrix and (s.mode == "affine" or (s.mode == "nf4" and elements != shape.vocab * shape.hidden)):
                total += elements
        return total
    embed = shape.vocab * shape.hidden
    linears = shape.layers * shape.block_linear_params()
    if shape.source_bits or s.mode == "affine":
        return float(embed + (0 if shape.tied else embed) + linears)
    return float(linears) if s.mode == "nf4" else 0.0


def float_copy_bytes(shape: ModelShape, s: StepSettings) -> float:
    """Bytes of the float32 copies `training.float_weights: float` keeps (0 off the CPU path)."""
    return 4.0 * quantized_elements(shape, s) if s.float_weights and s.dequantize_path else 0.0


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

    6 x hidden + 5 x intermediate + q + 2 x kv: the block input, both norm outputs, the residual,
    the attention output and a product output (hidden-sized); gate, up, sigmoid(gate), silu and
    their product (intermediate-sized); the rotated q, k and v. Checked by the slope over blocks
    (2 against 6 blocks of the Qwen2.5-0.5B shape, compiled step, 256/512/1024 tokens): 30.9k
    elements per token measured, 30.8k counted (README, "How the planner was measured").
    """
    d, f = shape.hidden, shape.intermediate
    mlp = CPU_SWIGLU_SAVED if cpu_swiglu(shape, s) else 5
    return 6 * d + mlp * f + shape.q_dim + 2 * shape.kv_dim + (shape.norms_per_block - 2) * d


# On the CPU in float32 these architectures run SwiGLU as one custom function (cpu_math.swiglu),
# which keeps gate, up and its output for the backward pass, not mlx-lm's five arrays: 4 measured
# intermediate-sized arrays per token (the slope over blocks at 256-1,024 tokens, Qwen2.5-0.5B and
# Llama-3.2-3B shapes). Not applied to grad-checkpointed steps: their two recomputed blocks are
# counted with 5.
CPU_SWIGLU_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
CPU_SWIGLU_SAVED = 4


def cpu_swiglu(shape: ModelShape, s: StepSettings) -> bool:
    """Whether the step runs `cpu_math.swiglu` (CPU, float32 activations, a SwiGLU architecture)."""
    return (s.dequantize_path and not s.grad_checkpoint and activation_bytes(shape, s) == 4
            and shape.model_type in CPU_SWIGLU_MODEL_TYPES)


# The constants below are slopes measured on the Qwen2.5-0.5B and Llama-3.2-3B block shapes (2 against 6,
# 1 against 3 blocks; 256, 512 and 1,024 tokens; compiled steps as `train` runs them, with cpu_math's
# SwiGLU as `run.load_base` installs it); README, "How the planner was measured".
SAVED_SCORE_COPIES = 1.0  # each block's softmax output waits for the backward pass
SAVED_SCORE_COPIES_SOFTCAP = 3.0  # gemma2: scores / cap, tanh and softmax (2 blocks x 2,048 tokens: +5.5%)
# ...but a checkpointed block recomputed for its backward keeps one copy, like the others: gemma-2-9b
# at 1 x 2,048 checkpointed measured 16.85 GB full depth and 4.57 GB at 2 blocks, predicted 19.07 and
# 6.01 with three copies (+13.2%, +31.6%), 18.0 and 4.94 with one (+6.8%, +8.1%)
SAVED_SCORE_COPIES_SOFTCAP_CHECKPOINTED = 1.0
BACKWARD_SCORE_COPIES = 1.0  # the block in its backward adds the scores' gradient (measured 0.93)
BACKWARD_MLP_COPIES = 2  # ...and its MLP's gate and up gradients, intermediate-sized per token
CHECKPOINT_KEPT_INTERMEDIATE = 1.3  # a checkpointed block keeps, per token, its input and this many
# intermediate-sized arrays (fit over both shapes at batch 1 and 4 and the full-depth cells; mlx-lm
# passes the causal mask as "causal", so no T x T mask is kept, unlike the boolean mask of earlier versions)
RECOMPUTED_BLOCKS = 2  # checkpointing: the block in its backward and the next one, recomputed ahead of it


def score_elements(shape: ModelShape, s: StepSettings) -> float:
    """Elements of one block's attention scores: sequences x heads x T x T."""
    return float(sequences(s) * shape.heads * s.seq_length * s.seq_length)


def head_quantized(shape: ModelShape, s: StepSettings) -> bool:
    """Whether the output head (the tied embedding, or the output matrix) is held quantized: GGUF's
    own type, an MLX 4/8-bit checkpoint, or `quantization.mode: affine`; NF4 leaves it float (QLoRA)."""
    if shape.gguf_tensors is not None:
        found = {name: (type_name, elements, matrix) for name, type_name, elements, matrix in shape.gguf_tensors}
        type_name, elements, matrix = found.get("output.weight") or found.get("token_embd.weight") or ("F32", 0, True)
        return gguf_tensor_bytes(type_name, elements) is not None or (matrix and s.mode == "affine")
    return bool(shape.source_bits) or s.mode == "affine"


def _chunk_rows(rows: int) -> int:
    """loss.py's chunk rows: a power of two in [512, 8,192]."""
    return max(512, min(8192, 1 << max(rows, 1).bit_length() - 1))


def head_working_bytes(shape: ModelShape, s: StepSettings) -> float:
    """The output head and loss at the start of the backward pass, in bytes.

    Chunked loss (loss.py): ~10 chunks' worth of float32 logits (a chunk is ~2 MB, but at least
    512 vocabulary rows: 4 MB at 2,048 positions; 12.5 for a float head on the CPU, see
    HEAD_CHUNK_LIVE_FLOAT_CPU), the head's rows dequantized (CPU path: ~8 chunks of at most
    ~4 MB each, whatever the number of loss positions; loss.CHUNK_WEIGHT_BYTES), and the hidden
    states and their gradient. Counting the 512-row floor brought the checkpointed batch-4 x 512
    test step from 8% under to within bounds (tests/test_memory_plan.py). Soft-capped logits
    (gemma2) go through the same chunks, the cap applied per chunk.
    """
    tokens = sequences(s) * s.seq_length
    hidden_states = 2 * tokens * shape.hidden * 4
    if not (s.dequantize_path and head_quantized(shape, s) and not s.float_weights):
        rows = _chunk_rows(HEAD_CHUNK_LOGITS_BYTES // (4 * tokens))
        live = HEAD_CHUNK_LIVE_FLOAT_CPU if s.dequantize_path else HEAD_CHUNK_LIVE
        # A chunk has at least 512 rows, so beyond 1,024 positions its logits outgrow the 2 MB target.
        return live * max(HEAD_CHUNK_LOGITS_BYTES, 4 * tokens * min(rows, shape.vocab)) + hidden_states
    # A dequantized head: the head runs at the K positions with loss (K <= tokens, a multiple of 32),
    # and K sets the chunk rows: few positions, wide chunks of dequantized rows (capped) and small
    # logits; many, narrow chunks and large logits. The worst K is counted.
    weight_rows = min(_chunk_rows(HEAD_CHUNK_WEIGHT_BYTES // (4 * shape.hidden)), shape.vocab)
    worst = 0.0
    for k in sorted({tokens, *(1 << i for i in range(5, max(tokens, 32).bit_length()))}):
        rows = min(_chunk_rows(HEAD_CHUNK_LOGITS_BYTES // (4 * k)), weight_rows)
        dequantized_rows = min(HEAD_DEQUANTIZED_CHUNKS_LIVE * rows, shape.vocab)  # never more than the whole head
        worst = max(worst, HEAD_CHUNK_LIVE * 4.0 * k * rows + dequantized_rows * shape.hidden * 4.0)
    return worst + hidden_states


def components(shape: ModelShape, s: StepSettings) -> dict[str, float]:
    """Named parts of the predicted training-step peak, in bytes; their sum is the peak.

    The peak comes during the backward pass with every block's saved activations alive, plus
    the larger of two working sets: the output head / loss, or one block's backward (its
    scores' gradient and, on the CPU path, its dequantized weights); the other is reported as 0.
    Activations, scores and the head count `sequences(s)` rows: 2 per pair for dpo / orpo.
    """
    a = activation_bytes(shape, s)
    tokens = sequences(s) * s.seq_length
    trainable = lora_parameters(shape, s)
    # the gradient, and the running sum when micro-batches are accumulated
    grads = trainable * 4 * (2 if s.grad_accumulation > 1 else 1)
    scores = score_elements(shape, s) * a
    softcap = SAVED_SCORE_COPIES_SOFTCAP_CHECKPOINTED if s.grad_checkpoint else SAVED_SCORE_COPIES_SOFTCAP
    saved_copies = softcap if shape.attention_softcap else SAVED_SCORE_COPIES
    per_block = block_saved_elements(shape, s) * tokens * a
    # Only the adapted blocks (lora.num_layers, the last ones) are differentiated: the frozen blocks
    # below them run forward only and keep nothing for the backward pass (measured on the test shape,
    # 8 blocks, batch 2 x 512: 244.5 MB with all 8 adapted, 90.0 with the last 2, 64.9 with 1).
    blocks = adapted_blocks(shape, s)
    if s.grad_checkpoint:  # each block keeps its input and more (above); two blocks are recomputed at a time
        recomputed = min(RECOMPUTED_BLOCKS, blocks)
        kept = shape.hidden + CHECKPOINT_KEPT_INTERMEDIATE * shape.intermediate
        activations = blocks * tokens * kept * a + recomputed * per_block
        saved_scores = recomputed * saved_copies * scores
    else:
        activations = blocks * per_block
        saved_scores = blocks * saved_copies * scores
    # Row groups on CPU streams (cpu_streams.py) run their backward passes side by side: each has
    # its own gradient until the groups' sum. Their working sets (head, dequantized layer), each
    # over its own rows, measured about the whole batch's: counting one per group over-counted
    # (the demo's quantized SFT step, batch 4 x 72: 0.545 GB measured on 2 streams, 0.538 on one;
    # 0.608-0.612 planned so, 0.593 as counted here; the test shape 262 MB on 2, 269 on one).
    streams = max(1, min(s.cpu_streams, s.batch_size))
    grads += trainable * 4 * (streams - 1)
    head = head_working_bytes(shape, s)
    # a block in its backward: its scores' gradient, and its MLP's gate and up gradients
    attention_backward = BACKWARD_SCORE_COPIES * scores + BACKWARD_MLP_COPIES * tokens * shape.intermediate * a
    transient = 0.0
    copies = float_copy_bytes(shape, s)
    if s.dequantize_path and s.mode != "none" and not copies:
        # the MLP's frozen matrices in float32, forward and backward copies: the compiled step
        # dequantizes a block's MLP products together (measured 5.7 and 5.9 copies of the widest
        # layer on the Qwen2.5-0.5B and Llama-3.2-3B shapes: 6 counted)
        mlp = [p for p in shape.projections() if p.name in MLP_PROJECTIONS]
        transient = 2.0 * sum(p.inputs * min(p.outputs, ROW_CHUNK) for p in mlp) * 4
    # the head's working set comes first in the backward pass, a block's backward (its scores'
    # gradient and dequantized weights) later: the larger of the two is counted, the other is 0
    block_working = attention_backward + transient
    head_first = head >= block_working
    reference = {REFERENCE_COMPONENT: 4.0 * sequences(s)} if s.objective == "dpo" else {}
    return {
        "frozen base": base_bytes(shape, s),
        "float copies (CPU)": copies,
        "LoRA parameters": trainable * 4.0,
        "AdamW state": trainable * 8.0,
        "gradients": float(grads),
        "activations": float(activations),
        "attention scores": float(saved_scores + (0.0 if head_first else attention_backward)),
        "output head / loss": float(head if head_first else 0.0),
        "dequantized layer": float(0.0 if head_first else transient),
        **reference,
        "fixed overhead": FIXED_OVERHEAD_BYTES,
    }


def kv_cache_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """Bytes of KV cache one token holds in every layer: keys and values, (kv_heads, head_dim) each.

    2 * layers * kv_heads * head_dim * dtype_bytes (the usual KV-cache size formula, e.g. in vLLM's
    block manager). A sliding-window layer (Gemma 3's local layers) stops growing at its window: the
    server's scheduler counts those per layer (`serve.scheduler.Scheduler.row_slots`).
    """
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype_bytes
