"""``tokenprune.pipeline``: a standard transformers ``Pipeline`` whose model is patched."""
from __future__ import annotations

from typing import Any

from .api import apply
from .registry import check_keep, get_method


def pipeline(task: str | None = None, model: Any = None, *, method: str | None = None, keep: float = 0.33,
             options: dict[str, Any] | None = None, **pipeline_kwargs: Any):
    """``transformers.pipeline(task, model=model, **pipeline_kwargs)`` with ``tokenprune.apply(pipe.model,
    method, keep, **options)``; returns the pipeline, whose outputs keep their standard format.

    Tasks served: image-classification, zero-shot-image-classification (CLIP, SigLIP: only the
    vision tower is reduced) and image-feature-extraction (the features have the reduced token
    count). ``method``, ``keep`` and ``options`` are checked before the model is loaded.
    """
    from transformers import pipeline as hf_pipeline

    keep = check_keep(keep)
    options = dict(options or {})
    if method is not None:
        get_method(method)(keep=keep, **options)  # a bad method or option fails before loading
    pipe = hf_pipeline(task, model=model, **pipeline_kwargs)
    apply(pipe.model, method, keep=keep, **options)
    return pipe
