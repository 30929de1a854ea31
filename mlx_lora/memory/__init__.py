"""Memory planning: predict a training step's peak from config.json / a GGUF header, and guard the run.

`shape.py` reads a model's shape and weight storage without loading weights; `estimate.py`
turns a shape and a run config into named components of the peak; `plan.py` decides whether
it fits, suggests cheaper settings, picks `batch_size: auto`, and formats the table; `sizes.py`
reads memory sizes as users write them.
"""
