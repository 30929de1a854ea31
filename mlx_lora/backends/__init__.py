"""Alternative training backends that read the same Config and write the same output folder.

`cuda`: transformers + PEFT + bitsandbytes (QLoRA on NVIDIA GPUs). Each backend imports its
framework inside its functions, so importing this package costs nothing.
"""
