"""`mlx-lora serve`: an OpenAI-compatible server for a base model and its LoRA adapters.

`engine.py` generates (one worker, adapters switched in place), `app.py` speaks HTTP,
`schemas.py` defines the bodies, `cli.py` is the command, `client.py` is test_mlx.py's logic.
Nothing is imported here, so `import mlx_lora.serve` stays cheap.
"""
