"""mlx-lora: LoRA / QLoRA fine-tuning on MLX, with data conversion, fusing and serving.

Importing the package imports neither mlx nor torch; each module pulls in its
framework when it is used.
"""

__version__ = "0.1.0"
