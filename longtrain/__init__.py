"""longtrain: long-sequence and looped-transformer training on many GPUs.

The import package ``longtrain`` is assembled from the repository's root folders (``trainer/``,
``parallel/``, ``memory/``, ``data/``, ``launch/``, ``models/``, ``configs/``), mapped in
pyproject.toml. This file owns only that mapping for a plain source checkout: when the folder
that holds this package also holds those root folders (running from a clone without installing,
or ``python -m pytest`` from the root, where this folder would otherwise shadow the installed
package), they are made importable as ``longtrain.<name>`` too.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "trainer").is_dir():
    if str(_root) not in __path__:
        __path__.append(str(_root))
