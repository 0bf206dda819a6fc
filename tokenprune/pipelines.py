"""``tokenprune.pipeline``: a standard transformers ``Pipeline`` whose model is patched."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .api import apply
from .registry import check_keep, get_method


def pipeline(task: str | None = None, model: Any = None, *, method: str | None = None, keep: float = 0.33,
             options: dict[str, Any] | None = None, **pipeline_kwargs: Any):
    """``transformers.pipeline(task, model=model, **pipeline_kwargs)`` with ``tokenprune.apply(pipe.model,
    method, keep, **options)``; returns the pipeline, whose outputs keep their standard format.

    Tasks served: image-classification, zero-shot-image-classification (CLIP, SigLIP: only the
    vision tower is reduced) and image-feature-extraction (the features have the reduced token
    count). ``method``, ``keep`` and ``options`` are checked before the model is loaded. Native
    ``options`` need an explicit ``method``: with ``method=None`` the default is the model family's,
    known only once the model is loaded, and options are method-specific.
    """
    keep = check_keep(keep)
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict of native method options, got {type(options).__name__}")
    options = dict(options or {})
    if method is None and options:
        raise ValueError(f"options {sorted(options)} need an explicit method (e.g. method='tome'): with method=None "
                         "the default depends on the model, known only after loading, and options are per method")
    if method is not None:
        get_method(method)(keep=keep, **options)  # a bad method or option fails before loading
    from transformers import pipeline as hf_pipeline

    pipe = hf_pipeline(task, model=model, **pipeline_kwargs)
    apply(pipe.model, method, keep=keep, **options)
    return pipe
