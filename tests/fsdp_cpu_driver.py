"""Run the CUDA backend under accelerate's FSDP on CPU processes (gloo), for tests only.

accelerate prepares FSDP only for accelerator devices: on CPU (ACCELERATE_USE_CPU=1) its state
says MULTI_CPU and ignores the FSDP config. This driver, started by `accelerate launch
--config_file configs/accelerate/fsdp_qlora.yaml`, turns that state into FSDP with the plugin the
launcher's environment describes, then trains: torch's FSDP1 itself runs on CPU with gloo.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file ... --num_processes 2 tests/fsdp_cpu_driver.py CONFIG [key=value ...] [--resume]
"""

from __future__ import annotations

import sys

import torch

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from mlx_lora.backends.cuda import run_training
from mlx_lora.config import load_config

_init = AcceleratorState.__init__


def _init_as_fsdp(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type in (DistributedType.MULTI_CPU, DistributedType.NO) and getattr(self, "fsdp_plugin", None) is None:
        self.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch set
        # Each AcceleratorState() copies PartialState's fields over its own, so both must say FSDP; the
        # device is "cpu", as the parameters' (FSDP refuses "cpu:0" against "cpu").
        for state in (self, PartialState()):
            state.distributed_type = DistributedType.FSDP
            state.device = torch.device("cpu")


AcceleratorState.__init__ = _init_as_fsdp

if __name__ == "__main__":
    items = [item for item in sys.argv[2:] if item != "--resume"]
    run_training(load_config(sys.argv[1], items), resume="--resume" in sys.argv[2:], device="cpu")
