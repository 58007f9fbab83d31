"""Tensor parallelism on torch.distributed: the process group (`parallel_state`) and the
worker processes with rank 0's runner (`executor`). The parallel layers are in
labengine/models/layers.py."""
from labengine.distributed.parallel_state import get_tp_rank, get_tp_size

__all__ = ["get_tp_rank", "get_tp_size", "TensorParallelModelRunner"]


def __getattr__(name):
    # imported lazily: the executor imports the model runner, which imports the models,
    # whose layers import parallel_state from this package
    if name == "TensorParallelModelRunner":
        from labengine.distributed.executor import TensorParallelModelRunner

        return TensorParallelModelRunner
    raise AttributeError(name)
