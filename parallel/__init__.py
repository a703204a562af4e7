"""Parallelism applied to plain models: the device mesh, Ulysses, tensor and data parallel.

``init_distributed(cfg) -> ParallelDims`` (mesh.py), ``parallelize(model, dims, cfg)``
(parallelize.py: tensor_parallel.py -> ulysses.py -> memory policy -> compile -> fsdp.py), and the
reductions the trainer uses (reduce.py).
"""

from longtrain.parallel.mesh import FLAT_DIMS, MESH_DIMS, ParallelDims, init_distributed
from longtrain.parallel.parallelize import parallelize
from longtrain.parallel.reduce import all_reduce_max, all_reduce_sum, clip_grad_norm_, grad_norm

__all__ = ["FLAT_DIMS", "MESH_DIMS", "ParallelDims", "all_reduce_max", "all_reduce_sum", "clip_grad_norm_",
           "grad_norm", "init_distributed", "parallelize"]
