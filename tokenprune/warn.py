"""Warnings that point at the user's line: the first frame outside torch, timm, transformers and tokenprune.

A warning raised inside a forward is many frames below the call that caused it (``nn.Module.__call__``,
``forward_features``, a compiled wrapper, ...), and how many depends on the path; a fixed ``stacklevel``
showed torch's ``module.py`` instead of the caller's line."""
from __future__ import annotations

import os
import sys
import warnings

_LIBRARIES = ("torch", "timm", "transformers", "accelerate", "tokenprune", "tokenprune.patches", "tokenprune.eval")


def _library_dirs() -> tuple[str, ...]:
    modules = (sys.modules.get(name) for name in _LIBRARIES)
    return tuple(os.path.dirname(m.__file__) + os.sep for m in modules if getattr(m, "__file__", None))


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the innermost frame outside the libraries (the outermost frame when
    every frame is theirs, as under the command-line tools)."""
    libraries, frame, level = _library_dirs(), sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(libraries):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
