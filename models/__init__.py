"""Plain PyTorch models: the Llama-style decoder and the looped transformer.

``build_model(model_cfg)`` is the one constructor the trainer, tests and benchmarks use.
"""

from longtrain.models.llama import Llama
from longtrain.models.looped import Looped, sample_loops


def build_model(cfg):
    """A model for ``cfg`` (a ``ModelConfig``), initialised under the current RNG state.

    Build under ``torch.device("meta")`` for shapes too large for one device, then
    ``to_empty(device=...)`` and ``init_weights()`` after parallelising.
    """
    if cfg.arch == "llama":
        return Llama(cfg)
    if cfg.arch == "looped":
        return Looped(cfg)
    raise ValueError(f"model.arch={cfg.arch!r} is unknown; use 'llama' or 'looped'.")


__all__ = ["Llama", "Looped", "build_model", "sample_loops"]
