"""Plain PyTorch models: the Llama-style decoder and the looped transformer.

``build_model(model_cfg)`` is the one constructor the trainer, tests and benchmarks use;
``model_class(model_cfg)`` the class it builds, whose ``units_for(model_cfg)`` describes the model
before it exists (``models.units``); ``models.costs`` prices it from the config.
"""

from longtrain.models.llama import Llama
from longtrain.models.looped import Looped, loops_at, planned_loops, sample_loops
from longtrain.models.units import DescribedModel, Unit

_ARCHS = {"llama": Llama, "looped": Looped}


def model_class(cfg) -> type[DescribedModel]:
    """The class ``build_model(cfg)`` builds (``cfg`` a ``ModelConfig``)."""
    if cfg.arch not in _ARCHS:
        raise ValueError(f"model.arch={cfg.arch!r} is unknown; use one of {sorted(_ARCHS)}.")
    return _ARCHS[cfg.arch]


def units_of(cfg, n_loops: int | None = None) -> list[Unit]:
    """The units of ``build_model(cfg)``, without building it."""
    return model_class(cfg).units_for(cfg, n_loops)


def build_model(cfg) -> DescribedModel:
    """A model for ``cfg`` (a ``ModelConfig``), initialised under the current RNG state.

    Build under ``torch.device("meta")`` for shapes too large for one device, then
    ``to_empty(device=...)`` and ``init_weights()`` after parallelising.
    """
    return model_class(cfg)(cfg)


__all__ = ["DescribedModel", "Llama", "Looped", "Unit", "build_model", "model_class", "loops_at", "planned_loops", "sample_loops", "units_of"]
