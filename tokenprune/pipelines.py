"""``tokenprune.pipeline``: a standard transformers ``Pipeline`` whose model is patched."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .api import DEFAULT_KEEP, apply
from .budget import check_budget
from .registry import EncoderReducer, check_keep, get_method, method_names


def pipeline(task: str | None = None, model: Any = None, *, method: str | None = None, keep: float | None = None,
             flops: float | None = None, gflops: float | None = None, options: dict[str, Any] | None = None,
             **pipeline_kwargs: Any):
    """``transformers.pipeline(task, model=model, **pipeline_kwargs)`` with ``tokenprune.apply(pipe.model,
    method, keep, **options)``; returns the pipeline, whose outputs keep their standard format. ``keep``
    defaults to 0.33; or a FLOPs budget instead, ``flops`` or ``gflops``, as ``tokenprune.apply`` takes it
    (a zero-shot model's: its image tower's).

    Tasks served: image-classification, zero-shot-image-classification (CLIP, SigLIP: only the
    vision tower is reduced) and image-feature-extraction (the features have the reduced token
    count). ``method``, ``keep`` and ``options`` are checked before the model is loaded. Native
    ``options`` need an explicit ``method``: with ``method=None`` the default is the model family's,
    known only once the model is loaded, and options are method-specific.
    """
    budget = {name: value for name, value in (("flops", flops), ("gflops", gflops)) if value is not None}
    if budget:
        if keep is not None:
            raise TypeError("give keep or a FLOPs budget (flops= / gflops=), not both")
        check_budget(flops, gflops)
    else:
        keep = check_keep(DEFAULT_KEEP if keep is None else keep)
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict of native method options, got {type(options).__name__}")
    options = dict(options or {})
    if method is None and options:
        raise ValueError(f"options {sorted(options)} need an explicit method (e.g. method='tome'): with method=None "
                         "the default depends on the model, known only after loading, and options are per method")
    if method is not None:  # a bad method or option fails before loading (under a budget, at any keep)
        reducer = get_method(method)(keep=DEFAULT_KEEP if keep is None else keep, **options)
        if not isinstance(reducer, EncoderReducer):  # the tasks served run image encoders only
            encoders = ", ".join(m for m in method_names() if issubclass(get_method(m), EncoderReducer))
            raise TypeError(f"{reducer.name} is {reducer.kind}: pipelines run image encoders, which take {encoders}")
    from transformers import pipeline as hf_pipeline

    pipe = hf_pipeline(task, model=model, **pipeline_kwargs)
    apply(pipe.model, method, keep=keep, **budget, **options)
    return pipe
