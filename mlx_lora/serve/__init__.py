"""`mlx-lora serve`: an OpenAI-compatible server for a base model and its LoRA adapters.

`scheduler.py` batches (continuous batching, prompt cache), `multi_lora.py` applies each row's
adapter, `sampling.py` samples per sequence, `constraints.py` constrains output (llguidance),
`decode_weights.py` picks the CPU product for a quantized base, `engine.py` owns the model and
the worker thread, `text.py` turns tokens into text and tool calls, `app.py` and `responses.py`
speak HTTP, `schemas.py` defines the bodies, `cli.py` is the command, `client.py` is
test_mlx.py's logic. Nothing is imported here, so `import mlx_lora.serve` stays cheap.
"""
