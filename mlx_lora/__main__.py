"""`python -m mlx_lora ...` is the `mlx-lora` command."""

from .cli import main

raise SystemExit(main())
