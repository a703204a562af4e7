"""Parallelism applied to plain models: the device mesh, Ulysses, tensor and data parallel."""
