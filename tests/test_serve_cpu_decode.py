"""CPU decode set-up (`serve/cpu_decode.py`): rotary tables, product orientations and compiled norms
compute what the library's modules compute (float32 rounding), and a served batch decodes the same
tokens with them as without."""

from __future__ import annotations

import pytest

ROPES = [
    ("default", None, False, 64),
    ("default traditional", None, True, 64),
    ("partial dims", None, False, 32),  # Phi-style: only the first dims of the head rotate
    ("linear", {"type": "linear", "factor": 2.0}, False, 64),
    ("llama3", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}, False, 64),
    ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, False, 64),
]


@pytest.mark.parametrize("name,scaling,traditional,dims", ROPES, ids=[r[0] for r in ROPES])
def test_rotary_table_matches_the_module(name, scaling, traditional, dims):
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.rope_utils import initialize_rope

    from mlx_lora.serve.cpu_decode import RotaryTable, TableRoPE

    positions = 300
    rope = initialize_rope(dims, 10000.0, traditional, scaling, max_position_embeddings=256)
    table = TableRoPE(rope, RotaryTable(rope, dims, traditional, positions))
    x = mx.random.normal((3, 4, 5, 64), key=mx.random.key(1))  # (B, heads, L, head_dim)
    for probe, offset in [(x[:, :, :1], 0), (x[:, :, :1], 17), (x, 40), (x[:, :, :1], positions - 1),
                          (x[:, :, :1], mx.array([0, 9, positions - 1])), (x, mx.array([3, 0, 200]))]:
        want = np.array(rope(probe, offset=offset))
        got = np.array(table(probe, offset=offset))
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=0, err_msg=f"{name} offset {offset}")


def test_rotary_table_hands_back_what_it_cannot_do():
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_lora.serve.cpu_decode import RotaryTable, TableRoPE

    calls = []

    class Counting(nn.RoPE):
        def __call__(self, x, offset=0, **kwargs):
            calls.append((offset, kwargs))
            return super().__call__(x, offset=offset)

    rope = Counting(16, base=10000.0)
    table = TableRoPE(rope, RotaryTable(rope, 16, False, 8))
    calls.clear()
    x = mx.ones((1, 1, 3, 16))
    table(x, offset=2)
    assert calls == []  # from the table
    table(x, offset=6)  # runs past the table's 8 positions
    table(x, offset=0, inverse=True)  # an argument the table does not know
    assert calls == [(6, {}), (0, {"inverse": True})]


def test_rotary_tables_skip_a_module_the_table_cannot_reproduce():
    """A rotation that depends on more than the position (here: on the input's length) keeps its module."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_lora.serve.cpu_decode import TableRoPE, use_rotary_tables

    class LengthDependent(nn.RoPE):
        def __call__(self, x, offset=0):
            return mx.fast.rope(x, self.dims, traditional=False, base=10000.0 * x.shape[-2], scale=1.0, offset=offset)

    class Attention(nn.Module):
        def __init__(self, rope):
            super().__init__()
            self.rope = rope

    model = nn.Module()
    model.layers = [Attention(nn.RoPE(16, base=10000.0)), Attention(LengthDependent(16)), Attention(nn.RoPE(16, base=10000.0))]
    assert use_rotary_tables(model, 64) == 2
    assert [type(layer.rope) for layer in model.layers] == [TableRoPE, LengthDependent, TableRoPE]
    assert model.layers[0].rope._table is model.layers[2].rope._table  # equal settings share one table
    assert tree_flatten(model.parameters()) == []  # the tables are not parameters
    assert [name for name, _ in model.named_modules() if name.endswith("_module")] == []


def test_one_forward_pass_builds_the_rotary_rows_once_for_every_layer():
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from mlx_lora.serve.cpu_decode import ForwardPasses, RotaryTable, TableRoPE

    built = []

    class Counted(RotaryTable):
        def rows(self, offset, length):
            built.append((offset if isinstance(offset, int) else offset.tolist(), length))
            return super().rows(offset, length)

    rope = nn.RoPE(16, base=10000.0)
    table = Counted(rope, 16, False, 64)
    passes = ForwardPasses()
    table.passes = passes
    layers = [TableRoPE(rope, table) for _ in range(3)]
    q, k = mx.random.normal((2, 4, 1, 16), key=mx.random.key(0)), mx.random.normal((2, 2, 1, 16), key=mx.random.key(1))
    offsets = [mx.array([5, 9]) for _ in layers]  # each layer's cache holds its own offsets, equal in value
    with passes.one():
        inside = [(layer(q, offset=o), layer(k, offset=o)) for layer, o in zip(layers, offsets)]
        assert built == [([5, 9], 1)]  # once for queries and keys of all three layers
        layers[0](mx.ones((2, 4, 3, 16)), offset=offsets[0])  # another length: rows of its own
        layers[0](q, offset=4)  # an int offset: its own
        assert built[1:] == [([5, 9], 3), (4, 1)]
    with passes.one():  # the next pass builds afresh
        layers[0](q, offset=mx.array([6, 10]))
        assert built[-1] == ([6, 10], 1)
    built.clear()
    outside = [(layer(q, offset=o), layer(k, offset=o)) for layer, o in zip(layers, offsets)]
    assert len(built) == 3  # outside a pass: once per layer (its queries and keys share them)
    for (qi, ki), (qo, ko) in zip(inside, outside):
        np.testing.assert_array_equal(np.array(qi), np.array(qo))
        np.testing.assert_array_equal(np.array(ki), np.array(ko))
    np.testing.assert_allclose(np.array(inside[0][0]), np.array(rope(q, offset=mx.array([5, 9]))), atol=2e-6)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 8, 9])
def test_decode_linear_orientations_agree(bias, rows):
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from mlx_lora.serve.cpu_decode import DecodeLinear, ProductPlan, twin

    layer = nn.Linear(48, 80, bias=bias)
    x = mx.random.normal((rows, 1, 48), key=mx.random.key(rows))
    plan = ProductPlan(max_rows=8, measured={(80, 48): {1: "transposed", 4: "transposed", 8: "transposed"}})
    decode = twin(DecodeLinear, layer, plan)
    assert plan.method((80, 48), rows) == ("transposed" if rows <= 8 else "plain")
    want = np.array(layer(x), dtype=np.float64)
    got = np.array(decode(x), dtype=np.float64)
    assert got.shape == want.shape == (rows, 1, 80)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_product_plan_looks_up_the_next_measured_row_count():
    from mlx_lora.serve.cpu_decode import ProductPlan, _row_counts

    assert _row_counts(8) == [1, 2, 4, 8] and _row_counts(6) == [1, 2, 4, 6] and _row_counts(1) == [1]
    plan = ProductPlan(max_rows=8, measured={(4, 4): {1: "plain", 2: "plain", 4: "transposed", 8: "panel"}})
    assert [plan.method((4, 4), r) for r in range(1, 10)] == ["plain"] * 2 + ["transposed"] * 2 + ["panel"] * 4 + ["plain"]
    assert plan.method((5, 4), 4) == "plain"  # a shape never measured
    assert plan.summary().startswith("panel kernel for 4x4 at 8 rows; transposed for 4x4 at 4 rows")


def test_decode_norm_matches_the_library():
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from mlx_lora.serve.cpu_decode import DecodeRMSNorm, use_decode_norms

    model = nn.Module()
    model.norm = nn.RMSNorm(96, eps=1e-6)
    model.norm.weight = mx.random.normal((96,), key=mx.random.key(3))
    reference = nn.RMSNorm(96, eps=1e-6)
    reference.weight = model.norm.weight
    assert use_decode_norms(model, max_rows=8) == 1 and isinstance(model.norm, DecodeRMSNorm)
    for shape in [(8, 1, 96), (1, 1, 96), (2, 30, 96)]:  # decode rows (compiled), a prefill (the library's)
        x = mx.random.normal(shape, key=mx.random.key(shape[1])) * 3
        np.testing.assert_allclose(np.array(model.norm(x)), np.array(reference(x)), atol=2e-6, rtol=1e-5)


def test_bad_mode_is_refused():
    import mlx.nn as nn

    from mlx_lora.serve.cpu_decode import use_cpu_decode

    with pytest.raises(ValueError, match="cpu_decode: 'fast' is not one of auto, none, plain, transposed, panel"):
        use_cpu_decode(nn.Module(), 8, 64, "fast")


@pytest.mark.parametrize("mode", ["transposed", "panel", "auto"])
def test_served_batch_decodes_the_same_tokens_as_the_library(tiny_model_dir, mode):
    """Greedy decoding of a mixed batch (different prompt lengths, so per-row rotary offsets and
    left padding) with the CPU decode set-up gives the library's tokens."""
    from mlx_lora.serve.engine import Engine

    from test_serve_batching import drain, scheduler, sequence

    specs = [{"id": i, "prompt": prompt, "max_tokens": 10}
             for i, prompt in enumerate(["hi", "a much longer prompt that spans more tokens than the others",
                                         "three", "x y z w", "the quick brown fox"])]
    results = {}
    for decode in ("none", mode):
        engine = Engine.from_source(str(tiny_model_dir), base_name="base", cpu_decode=decode)
        if decode == "none":
            assert engine.decode_setup.products is None
        else:
            assert engine.decode_setup.rotary_layers == 2 and engine.decode_setup.norms == 5
            if decode == "panel":  # every product of up to max_batch rows on the kernel
                plan = engine.decode_setup.products
                assert plan.kernel is not None, plan.kernel_note
                assert {m for choices in plan.measured.values() for m in choices.values()} == {"panel"}
        out = {}
        sched = scheduler(engine)
        for spec in specs:
            sched.add(sequence(engine, spec, out))
        drain(sched)
        results[decode] = {key: value["tokens"] for key, value in out.items()}
    assert results[mode] == results["none"]
    assert all(len(tokens) == 10 for tokens in results["none"].values())
