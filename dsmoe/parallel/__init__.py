"""Scale-out on torch.distributed: expert parallelism, FSDP2, sharded checkpoints.

`launch.init()` joins a torchrun job and returns a `DistContext`; `parallelize(model,
layout, ctx)` shards a model built for one device; `checkpoint.save/load` write and read
DCP checkpoints at any world size. See docs/distributed.md.
"""
from dsmoe.parallel.launch import DistContext, in_torchrun, init, shutdown
from dsmoe.parallel.parallelize import ParallelLayout, clip_grad_norm_, parallelize

__all__ = ["DistContext", "ParallelLayout", "clip_grad_norm_", "in_torchrun", "init", "parallelize",
           "shutdown"]
