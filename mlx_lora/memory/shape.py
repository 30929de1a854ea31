"""A model's shape and its weights' storage, read from config.json or a GGUF header (no weights).

Architecture differences come from config.json fields: `head_dim` (gemma: 256, not
hidden / heads), `tie_word_embeddings`, `attention_bias` (qwen2 has q/k/v biases and no such
field, so its `model_type` implies it), phi3's fused `qkv_proj` / `gate_up_proj`, gemma2's
`final_logit_softcapping` (applied per chunk of the loss) and extra norms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# model_type -> the family's traits that config.json does not state as fields
FUSED_PROJECTIONS = {"phi3"}  # qkv_proj and gate_up_proj
QKV_BIAS_BY_TYPE = {"qwen2": True}  # Qwen2's config.json has no attention_bias, its q/k/v carry biases
NORMS_PER_BLOCK = {"gemma2": 4, "gemma3_text": 4, "gemma3": 4}  # pre/post attention and MLP norms
KNOWN_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3"}

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Linear:
    """One projection of a block: its Hugging Face name and (in, out) sizes."""

    name: str
    inputs: int
    outputs: int
    bias: bool = False


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a model; sizes in elements, not bytes."""

    model_type: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    dtype_bytes: int  # the float dtype of the checkpoint (bfloat16: 2)
    qkv_bias: bool = False
    fused: bool = False
    norms_per_block: int = 2
    logit_softcap: bool = False  # gemma2: the chunked loss caps each chunk's logits
    attention_softcap: bool = False  # gemma2: attention in plain ops (scores saved)
    # GGUF: (name, GGML type, elements, is a matrix) per tensor; None for Hugging Face checkpoints
    gguf_tensors: tuple[tuple[str, str, int, bool], ...] | None = None
    source_formats: dict[str, int] = field(default_factory=dict)
    # an MLX-quantized folder (mlx-community 4-bit): every linear and embedding at these settings
    source_bits: int | None = None
    source_group: int | None = None
    max_positions: int | None = None  # max_position_embeddings: the context the model was trained for
    sliding_window: int | None = None  # gemma2: its window, which mlx-lm's model does not apply

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def projections(self) -> list[Linear]:
        """The linear layers of one block, in Hugging Face names."""
        d, f, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        if self.fused:
            return [Linear("qkv_proj", d, q + 2 * kv), Linear("o_proj", q, d),
                    Linear("gate_up_proj", d, 2 * f), Linear("down_proj", f, d)]
        return [Linear("q_proj", d, q, self.qkv_bias), Linear("k_proj", d, kv, self.qkv_bias),
                Linear("v_proj", d, kv, self.qkv_bias), Linear("o_proj", q, d),
                Linear("gate_proj", d, f), Linear("up_proj", d, f), Linear("down_proj", f, d)]

    def block_linear_params(self) -> int:
        return sum(p.inputs * p.outputs for p in self.projections())

    def parameters(self) -> int:
        """All parameters (embedding, head when untied, blocks)."""
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + head + self.layers * self.block_linear_params()


# Fields a family's published config.json may leave out, with the values its transformers config
# class (and mlx-lm's model) default to: google/gemma-3-4b-it and up give only a few `text_config` fields.
TYPE_DEFAULTS = {
    "gemma3": {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 262208},
}


def _need(config: dict, key: str, where: str, default: int | None = None) -> int:
    """config[key] as a positive integer (or `default` when absent); ValueError naming the field."""
    value = config.get(key)
    if value is None:  # absent or null (mlx-lm's model args hold None for fields the config left out)
        value = default
    if value is None:
        state = "sets 'null' for" if key in config else "has no"
        raise ValueError(f"{where}: config.json {state} {key!r}; the planner cannot size this model")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value <= 0:
        raise ValueError(f"{where}: {key!r} must be a positive integer, got {value!r}; fix config.json")
    return int(value)


def shape_from_config(config: dict, where: str = "config.json") -> ModelShape:
    """A ModelShape from a Hugging Face config.json dict (multimodal ones: their `text_config`).

    Raises ValueError naming the missing field, or the unknown `model_type`.
    """
    if not isinstance(config, dict):
        raise ValueError(f"{where}: config.json holds a {type(config).__name__}, not an object of model settings")
    defaults = dict(TYPE_DEFAULTS.get(str(config.get("model_type")), {}))
    if isinstance(config.get("text_config"), dict) and "hidden_size" not in config:
        text = config["text_config"]
        defaults.update({k: v for k, v in config.items() if k in ("vocab_size", "torch_dtype", "dtype")})
        config = {**text, "model_type": text.get("model_type", config.get("model_type"))}
    if "model_type" not in config:
        raise ValueError(f"{where}: config.json has no 'model_type'; the planner cannot tell the architecture")
    model_type = str(config["model_type"])
    if model_type not in KNOWN_TYPES:
        raise ValueError(f"{where}: model_type '{model_type}' is not one the planner knows "
                         f"({', '.join(sorted(KNOWN_TYPES))})")
    config = {**defaults, **{k: v for k, v in config.items() if v is not None or k not in defaults}}
    hidden = _need(config, "hidden_size", where)
    heads = _need(config, "num_attention_heads", where)
    kv_heads = _need(config, "num_key_value_heads", where, default=heads)
    head_dim = _need(config, "head_dim", where, default=hidden // heads or None)
    if heads % kv_heads:
        raise ValueError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}; "
                         "fix config.json")
    # transformers 4.56+ and 5 write `dtype` where older versions wrote `torch_dtype`
    dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    return ModelShape(
        model_type=model_type, hidden=hidden,
        layers=_need(config, "num_hidden_layers", where),
        intermediate=_need(config, "intermediate_size", where),
        heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        vocab=_need(config, "vocab_size", where),
        tied=bool(config.get("tie_word_embeddings", model_type.startswith("gemma"))),
        dtype_bytes=DTYPE_BYTES.get(str(dtype), 2),
        qkv_bias=bool(config.get("attention_bias", QKV_BIAS_BY_TYPE.get(model_type, False))),
        fused=model_type in FUSED_PROJECTIONS,
        norms_per_block=NORMS_PER_BLOCK.get(model_type, 2),
        logit_softcap=bool(config.get("final_logit_softcapping")),
        attention_softcap=bool(config.get("attn_logit_softcapping")),
        max_positions=_optional_int(config.get("max_position_embeddings")),
        sliding_window=_optional_int(config.get("sliding_window")) if model_type == "gemma2" else None,
    )


def _optional_int(value) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def gguf_tensor_bytes(type_name: str, elements: int) -> float | None:
    """Bytes of a GGUF tensor as MLX holds it once loaded (`models/gguf_types.py`: every
    quantized type as affine groups of 32 with float32 scales and biases); None for a float type
    (the run may quantize it). Raises ValueError for a type the loader does not know."""
    from ..models.gguf_types import GROUP, block_type

    kind = block_type(type_name)
    if kind.bits is None:
        return None
    return elements * kind.bits / 8 + 2 * (elements / GROUP) * 4


def shape_from_gguf(path: str | Path) -> ModelShape:
    """A ModelShape from a GGUF header: the llama config it implies and its tensor directory."""
    from collections import Counter

    from ..models.gguf_arch import hf_config_from_header
    from ..models.gguf_file import read_header

    header = read_header(path)
    base = shape_from_config(hf_config_from_header(header), str(path))
    tensors = []
    for name, info in header.tensors.items():
        elements = 1
        for size in info.shape:
            elements *= size
        gguf_tensor_bytes(info.type_name, elements)  # an unknown type fails here, with its name
        tensors.append((name, info.type_name, elements, len(info.shape) == 2))
    formats = Counter(t for _, t, _, _ in tensors)
    dtype_bytes = 2 if any(t in ("F16", "BF16") for _, t, _, _ in tensors) else 4
    return ModelShape(**{**base.__dict__, "gguf_tensors": tuple(tensors), "source_formats": dict(formats),
                         "dtype_bytes": dtype_bytes})


def read_shape(source: str) -> ModelShape:
    """The shape of a model source (folder, .gguf, hub id, `demo`, or a config.json file) without
    loading its weights.

    A hub id downloads config.json only. Raises FileNotFoundError / ValueError with the reason.
    """
    from ..models.sources import DEMO_MODEL, demo_model_path

    if source == DEMO_MODEL:
        return shape_from_gguf(demo_model_path())
    from ..models.gguf_file import is_gguf_file

    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf" or (path.is_file() and is_gguf_file(path)):  # Ollama blobs have no suffix
        return shape_from_gguf(path)
    if path.suffix.lower() == ".json" and path.is_file():  # a config.json on its own (configs/models/hf_config/)
        config_file = path
    elif path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return shape_from_gguf(ggufs[0])
            if ggufs:
                raise FileNotFoundError(f"{path}: no config.json and {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs[:4])}"
                                        f"{', ...' if len(ggufs) > 4 else ''}); set model: to the one to train")
            raise FileNotFoundError(f"{path}: no config.json, so no memory prediction can be made")
    elif path.is_file():
        raise ValueError(f"model: {path} is a file but neither a GGUF nor a config.json; pass a GGUF file, a Hugging "
                         "Face model folder or its config.json")
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")):
        config_file = _hub_config(source)
    else:
        raise FileNotFoundError(f"model: {source!r} is neither an existing path nor a hub id (org/name) nor 'demo'")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from err
    shape = shape_from_config(config, str(config_file))
    quant = config.get("quantization") or config.get("quantization_config")
    if isinstance(quant, dict) and "bits" in quant and "group_size" in quant:  # an MLX-quantized folder
        return ModelShape(**{**shape.__dict__, "source_bits": int(quant["bits"]), "source_group": int(quant["group_size"]),
                             "source_formats": {f"{quant['bits']}-bit group {quant['group_size']}": 1}})
    return shape


def _hub_config(repo_id: str) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from ..models.sources import hub_unreachable

    try:
        return Path(hf_hub_download(repo_id, "config.json", local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        pass
    unreachable = hub_unreachable()
    if unreachable:
        raise FileNotFoundError(f"model: config.json of {repo_id!r} is not in the Hugging Face cache "
                                f"({constants.HF_HUB_CACHE}) and the hub cannot be reached ({unreachable}); connect "
                                "to the network once, or pass a local folder")
    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise FileNotFoundError(f"model: could not fetch config.json of {repo_id!r} from the hub ({reason}); check "
                                f"the id and your network (cache: {constants.HF_HUB_CACHE})") from err
