"""Fusing: the fused folder equals base + adapters, re-quantization is checked, GGUF export reads back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_serve import make_adapter

TOKENS = [[5, 17, 42, 8, 99, 3, 250, 11]]


def logits(model) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array(TOKENS)).astype(mx.float32), dtype=np.float64)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"), seed=1, magnitude=0.5)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapter_dir) -> np.ndarray:
    """Logits of base + adapters (unfused)."""
    from mlx_lora.adapters import load_adapters
    from mlx_lora.models import load_model

    model, _, _ = load_model(str(tiny_model_dir))
    load_adapters(model, adapter_dir)
    return logits(model)


@pytest.fixture(scope="module")
def fused_f32(tiny_model_dir, adapter_dir, tiny_data_dir, tmp_path_factory):
    from mlx_lora.fuse import fuse_adapters

    out = tmp_path_factory.mktemp("fused") / "f32"
    return fuse_adapters(str(tiny_model_dir), adapter_dir, out, dtype="float32", gguf=True,
                         check_prompts=tiny_data_dir / "test.jsonl")


def test_fused_folder_has_the_documented_files(fused_f32):
    names = {p.name for p in fused_f32.out_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "fuse_report.json",
            "model-f16.gguf"} <= names
    config = json.loads((fused_f32.out_dir / "config.json").read_text())
    assert "quantization" not in config and config["torch_dtype"] == "float32"
    report = json.loads((fused_f32.out_dir / "fuse_report.json").read_text())
    assert report["fused_layers"] == 14 and report["warnings"] == []


def test_fused_equals_base_plus_adapters(fused_f32, reference):
    from mlx_lora.models import load_model

    model, _, _ = load_model(str(fused_f32.out_dir))
    # float32 throughout: only summation order differs (W + s*A@B vs W@x + s*(x@A)@B)
    np.testing.assert_allclose(logits(model), reference, atol=1e-4, rtol=1e-4)
    check = fused_f32.report["check"]["fused_vs_base_plus_adapters"]
    assert check["greedy_agreement"] == 1.0 and check["max_logit_diff"] < 1e-3


def test_float16_fuse_is_close(tiny_model_dir, adapter_dir, reference, tmp_path):
    from mlx_lora.fuse import fuse_adapters
    from mlx_lora.models import load_model

    result = fuse_adapters(str(tiny_model_dir), adapter_dir, tmp_path / "f16", check=False)
    model, _, _ = load_model(str(result.out_dir))
    assert json.loads((result.out_dir / "config.json").read_text())["torch_dtype"] == "float16"
    # float16 weights: ~3 significant digits on logits of magnitude ~10
    np.testing.assert_allclose(logits(model), reference, atol=0.1)


def test_requantize_is_checked_and_a_lost_finetune_warns(tiny_model_dir, adapter_dir, tiny_data_dir, tmp_path):
    from mlx_lora.fuse import fuse_adapters
    from mlx_lora.models import load_model

    result = fuse_adapters(str(tiny_model_dir), adapter_dir, tmp_path / "q4", dtype="float32", quantize_bits=4,
                           group_size=32, check_prompts=tiny_data_dir / "test.jsonl")
    config = json.loads((result.out_dir / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    report = json.loads((result.out_dir / "fuse_report.json").read_text())
    check = report["check"]["fused_vs_base_plus_adapters"]
    assert 0.0 <= check["greedy_agreement"] <= 1.0 and check["max_logit_diff"] > 0
    assert report["warnings"] == result.warnings
    load_model(str(result.out_dir))  # mlx-lm reads the quantized folder


def test_verdict_warns_only_when_the_finetune_is_lost():
    from mlx_lora.fuse import verdict

    good = {"greedy_agreement": 1.0, "max_logit_diff": 0.01}
    lost = {"greedy_agreement": 0.55, "max_logit_diff": 4.0}
    base = {"greedy_agreement": 0.5, "max_logit_diff": 9.0}
    assert verdict(dict(good), dict(base)) == []
    warnings = verdict(dict(lost), dict(base))
    assert any("fine-tune is being lost" in w for w in warnings)


def test_gguf_export_reads_back(fused_f32, tiny_model_dir):
    from gguf import GGUFReader

    from mlx_lora.models.gguf_export import permute_rows
    from mlx_lora.models.gguf import load_gguf, unpermute_rows
    from mlx_lora.models import load_model

    path = fused_f32.gguf_path
    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    config = json.loads((fused_f32.out_dir / "config.json").read_text())
    assert len(tensors) == 2 * 9 + 3  # 9 per block, embeddings, final norm, untied output
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "F16"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    # the permutation is a bijection its inverse undoes
    rows = np.arange(64 * 3).reshape(64, 3)
    import mlx.core as mx

    np.testing.assert_array_equal(np.array(unpermute_rows(permute_rows(mx.array(rows), 4), 4)), rows)
    fused, tokenizer, _ = load_model(str(fused_f32.out_dir))
    q_hf = np.array(fused.model.layers[0].self_attn.q_proj.weight, dtype=np.float32)
    q_gguf = np.array(tensors["blk.0.attn_q.weight"].data, dtype=np.float32).reshape(q_hf.shape)
    np.testing.assert_allclose(np.array(unpermute_rows(mx.array(q_gguf), config["num_attention_heads"])), q_hf,
                               atol=2e-3, rtol=2e-3)
    # the whole file loads as a model (our GGUF reader) and computes what the fused folder computes
    from_gguf, gguf_tokenizer, _, _ = load_gguf(path)
    np.testing.assert_allclose(logits(from_gguf), logits(fused), atol=0.05)
    assert gguf_tokenizer.encode("say hello world") == tokenizer.encode("say hello world")


def test_fuse_cli_reports_errors_in_one_line(capsys, tmp_path):
    from mlx_lora.fuse import main

    assert main(["--adapter", str(tmp_path / "missing"), "--model", "x.gguf"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_a_crash_mid_write_keeps_the_previous_fused_folder(tiny_model_dir, adapter_dir, tmp_path, monkeypatch):
    from mlx_lora import fuse

    out = tmp_path / "fused"
    fuse.fuse_adapters(str(tiny_model_dir), adapter_dir, out, dtype="float32", check=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash_after_the_weights(out_dir, model, tokenizer, config):
        (out_dir / "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(fuse, "save_hf_folder", crash_after_the_weights)
    with pytest.raises(OSError, match="disk full"):
        fuse.fuse_adapters(str(tiny_model_dir), adapter_dir, out, dtype="float16", check=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["fused"]  # no staging folder left behind


def test_fuse_takes_key_value_overrides_after_the_config_as_train_does(tmp_path):
    from mlx_lora.cli import _split_config_and_overrides
    from mlx_lora.fuse import build_parser, resolve_inputs

    (tmp_path / "data").mkdir()
    config = tmp_path / "my.yaml"
    config.write_text(f"model: demo\ndata: {{path: {tmp_path / 'data'}}}\noutput_dir: {tmp_path / 'runs/a'}\n")
    args = build_parser().parse_args([str(config), f"output_dir={tmp_path / 'runs/b'}", "model=other.gguf", "--gguf"])
    path, overrides = _split_config_and_overrides(args.items)
    model, adapter_dir, out_dir, prompts, objective = resolve_inputs(path, args.model, args.adapter, args.out,
                                                                     args.prompts, overrides)
    assert (model, adapter_dir, out_dir) == ("other.gguf", tmp_path / "runs/b", tmp_path / "runs/b/fused")
    assert args.gguf and prompts == tmp_path / "data" / "test.jsonl" and objective == "sft"


# --- preference runs: the check reads the test split as the run's objective does ------------------

@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    from test_objectives import write_pairs

    return write_pairs(tmp_path_factory.mktemp("pairs"))


def preference_config(tmp_path, model_dir, data_dir, output_dir, objective="dpo", **training):
    import yaml

    path = tmp_path / f"{objective}.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(model_dir), "output_dir": str(output_dir), "data": {"path": str(data_dir), "max_seq_length": 64},
        "lora": {"rank": 4, "alpha": 8}, "eval": {"enabled": False},
        "training": {"objective": objective, "iters": 2, "batch_size": 2, "steps_per_eval": 0, "save_every": 0,
                     "steps_per_report": 1, **training}}))
    return path


def chosen_answer_positions(model_dir, test_file, limit=8) -> int:
    """Answer positions of the first `limit` test pairs' chosen sequences, as DPO training reads them."""
    from mlx_lora.config import DataConfig
    from mlx_lora.models import load_model
    from mlx_lora.preference_data import load_preference_split

    _, tokenizer, _ = load_model(str(model_dir))
    pairs = load_preference_split(test_file, tokenizer, DataConfig(path=str(test_file.parent)))
    return sum(sum(pair.chosen.mask[1:]) for pair in pairs[:limit])


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_a_preference_config_fuses_with_the_check_on_the_pairs_chosen_answers(
        tiny_model_dir, adapter_dir, pairs_dir, tmp_path, capsys, objective):
    from mlx_lora.fuse import main

    config = preference_config(tmp_path, tiny_model_dir, pairs_dir, adapter_dir, objective)
    assert main([str(config), "--out", str(tmp_path / "fused"), "--dtype", "float32"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "fused vs base+adapters: greedy agreement 100.0%" in out and "chosen answers" in out
    check = json.loads((tmp_path / "fused" / "fuse_report.json").read_text())["check"]
    assert check["objective"] == objective and check["prompts"] == 8
    # the compared positions are exactly the chosen answers' tokens, as for SFT the answers'
    assert check["fused_vs_base_plus_adapters"]["positions"] == chosen_answer_positions(tiny_model_dir,
                                                                                       pairs_dir / "test.jsonl")
    assert check["fused_vs_base_plus_adapters"]["greedy_agreement"] == 1.0
    assert check["base_vs_base_plus_adapters"]["greedy_agreement"] < 1.0  # the adapters change those answers


def test_a_dpo_run_fuses_and_serves_from_its_run_folder(tiny_model_dir, pairs_dir, tmp_path):
    """convert_and_serve.sh's path (`serve --from-run`): a real DPO run, fused with the check on."""
    from mlx_lora.config import load_config
    from mlx_lora.run import run_training
    from mlx_lora.serve.cli import from_run

    config = preference_config(tmp_path, tiny_model_dir, pairs_dir, tmp_path / "elsewhere", "dpo")
    run_training(load_config(config, [f"output_dir={tmp_path / 'run'}"]))
    # the training run's key=value items, as train and fuse take them (`serve --from-run CONFIG output_dir=...`)
    from mlx_lora.serve.cli import split_run_overrides

    serve_items, training = split_run_overrides(["port=9000", f"output_dir={tmp_path / 'run'}"])
    assert serve_items == ["port=9000"] and training == [f"output_dir={tmp_path / 'run'}"]
    settings = from_run(str(config), fuse=True, report=lambda line: None, overrides=training)
    assert settings["model"] == str(tmp_path / "run" / "fused")
    check = json.loads((tmp_path / "run" / "fused" / "fuse_report.json").read_text())["check"]
    assert check["objective"] == "dpo" and check["source"] == str(pairs_dir / "test.jsonl")
    assert check["fused_vs_base_plus_adapters"]["greedy_agreement"] >= 0.95  # float16 weights
    assert check["fused_vs_base_plus_adapters"]["positions"] == chosen_answer_positions(tiny_model_dir,
                                                                                       pairs_dir / "test.jsonl")


def test_an_sft_check_is_unchanged_by_the_objective_record(tiny_model_dir, tiny_data_dir):
    from mlx_lora.data import load_split
    from mlx_lora.config import DataConfig
    from mlx_lora.fuse import check_sequences
    from mlx_lora.models import load_model

    _, tokenizer, _ = load_model(str(tiny_model_dir))
    test_file = tiny_data_dir / "test.jsonl"
    expected = [(e.tokens, e.mask) for e in load_split(test_file, tokenizer, DataConfig(path=str(tiny_data_dir)))
                if any(e.mask)][:8]
    assert check_sequences(tokenizer, test_file) == check_sequences(tokenizer, test_file, objective="sft") == expected


GGUF_CORPUS = ["Hello world! It's 2024-12-02: 12 + 27 = 39.", "café naïve 東京 🙂 don't WE'LL", "x=1234567;y=0.5",
               "\n\n    indented\ttab  two  spaces\n"] * 50


def bpe_tokenizer(pre_tokenizer, normalizer=None):
    """A small BPE tokenizer with the given pre-tokenizer, as transformers loads one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(GGUF_CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def write_tokenizer_gguf(path, tokenizer):
    from gguf import GGUFWriter

    from mlx_lora.models.gguf_export import _write_bpe_tokenizer

    writer = GGUFWriter(str(path), "llama")
    _write_bpe_tokenizer(writer, tokenizer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_export_names_the_pre_tokenizer_so_the_file_splits_text_as_training_did(tmp_path, monkeypatch):
    from tokenizers import Regex, normalizers, pre_tokenizers

    from mlx_lora.models import gguf_export
    from mlx_lora.models.gguf_tokenizer import LLAMA3_REGEX, QWEN2_REGEX

    def split(regex):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    cases = {"qwen2": split(QWEN2_REGEX), "llama-bpe": split(LLAMA3_REGEX),
             "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)]),
             "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False)}
    for pre, pre_tokenizer in cases.items():
        tokenizer = bpe_tokenizer(pre_tokenizer)
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        assert gguf_export.llama_cpp_pre(spec) == pre
        gguf_export.check_round_trip(write_tokenizer_gguf(tmp_path / f"{pre}.gguf", tokenizer), tokenizer)
    # SentencePiece-style ('▁' for spaces: Mistral, Llama 2, Gemma, Phi-3) is refused in one line
    spm = bpe_tokenizer(pre_tokenizers.Metaspace(), normalizers.Replace(" ", "▁"))
    with pytest.raises(ValueError, match="SentencePiece-style"):
        gguf_export.llama_cpp_pre(json.loads(spm.backend_tokenizer.to_str()))
    # had the export named Qwen2's pre-tokenizer gpt-2 (as it did), the round trip catches the digits
    qwen = bpe_tokenizer(cases["qwen2"])
    monkeypatch.setattr(gguf_export, "llama_cpp_pre", lambda spec: "gpt-2")
    with pytest.raises(ValueError, match="splits .* into"):
        gguf_export.check_round_trip(write_tokenizer_gguf(tmp_path / "wrong.gguf", qwen), qwen)
