"""Tensor parallelism on torch.distributed: process groups (`parallel_state`), the worker
loop of ranks > 0 (`worker`), and the model transform (`tensor_parallel`)."""
