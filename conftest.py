"""pytest set-up for the repository root: the docstring examples of an adapter run only where its library is installed.

(``saflex_data/`` is collected with ``--doctest-modules``; an adapter module imports its upstream library, so it is
left out of collection, not failed, when that library is missing. The adapters' own tests skip the same way.)
"""

from __future__ import annotations

import importlib.util

_ADAPTER_LIBRARIES = {"albumentations": "albumentations", "kornia": "kornia", "timm": "timm",
                      "torchvision": "torchvision"}  # fmt: skip

collect_ignore = [
    f"saflex_data/adapters/{module}.py"
    for module, library in _ADAPTER_LIBRARIES.items()
    if importlib.util.find_spec(library) is None
]
