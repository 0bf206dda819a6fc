"""``tokenprune.pipeline``: a standard transformers ``Pipeline`` whose model is patched."""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from .api import DEFAULT_KEEP, apply
from .budget import check_budget
from .registry import EncoderReducer, TokenReducer, VisualTokenSelector, check_keep, get_method, method_names

#: the tasks served, and the kind of method each one's model takes
TASKS: dict[str, type[TokenReducer]] = {
    "image-classification": EncoderReducer,
    "zero-shot-image-classification": EncoderReducer,
    "image-feature-extraction": EncoderReducer,
    "image-text-to-text": VisualTokenSelector,
}


def pipeline(task: str | None = None, model: Any = None, *, method: str | None = None, keep: float | None = None,
             flops: float | None = None, gflops: float | None = None, positions: str | None = None,
             options: dict[str, Any] | None = None, **pipeline_kwargs: Any):
    """``transformers.pipeline(task, model=model, **pipeline_kwargs)`` with ``tokenprune.apply(pipe.model,
    method, keep, **options)``; returns the pipeline, whose outputs keep their standard format. ``keep``
    defaults to 0.33; or a FLOPs budget instead (image encoders), ``flops`` or ``gflops``, as ``tokenprune.apply``
    takes it, counted at the model's own input size (the size its image processor feeds; a zero-shot model's
    budget is its image tower's).

    Tasks served: image-classification, zero-shot-image-classification (CLIP, SigLIP: only the vision tower
    is reduced) and image-feature-extraction (the features have the reduced token count), which take the
    image-encoder methods; image-text-to-text (LLaVA, LLaVA-NeXT, Qwen2(.5)-VL), which takes the visual-token
    selectors, and ``positions`` as ``apply`` does. The task, ``method``, ``keep``, the budget and ``options``
    are checked before the model is loaded (against a task inferred from the model, ``task=None``, after).
    Native ``options`` need an explicit ``method``: with ``method=None`` the default is the model family's,
    known only once the model is loaded, and options are method-specific.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"tokenprune.pipeline serves the tasks {', '.join(TASKS)}; got {task!r}")
    misplaced = sorted(set(pipeline_kwargs) & _apply_arguments(TASKS.get(task)))
    if misplaced:
        sizes = "; a budget is counted at the size the image processor feeds" * ("input_size" in misplaced)
        raise TypeError(f"{', '.join(misplaced)} given to tokenprune.pipeline, whose other keywords go to "
                        f"transformers.pipeline: method options go in options={{...}}{sizes}")
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
    reducer = None
    if method is not None:  # a bad method or option fails before loading (under a budget, at any keep)
        reducer = get_method(method)(keep=DEFAULT_KEEP if keep is None else keep, **options)
    if task is not None:
        _check_task(task, reducer, budget, positions)
    from transformers import pipeline as hf_pipeline

    pipe = hf_pipeline(task, model=model, **pipeline_kwargs)
    if task is None:  # inferred from the model: checked now, as a given task was before loading
        if pipe.task not in TASKS:
            raise ValueError(f"tokenprune.pipeline serves the tasks {', '.join(TASKS)}; {type(pipe.model).__name__} "
                             f"runs {pipe.task!r}")
        _check_task(pipe.task, reducer, budget, positions)
    if budget:  # counted at the size the pipeline's processor feeds, which the config's image_size may not be
        budget["input_size"] = _fed_input_size(pipe)
    apply(pipe.model, method, keep=keep, **budget, positions=positions, **options)
    return pipe


def _fed_input_size(pipe) -> tuple[int, int, int] | None:
    """(C, H, W) the pipeline's image processor makes of a square image (DINOv2's config says 518 px, its processor
    crops 224); None (the model's own size) for a processor that does not resize, which feeds the images as given."""
    processor = getattr(pipe, "image_processor", None)
    if processor is None or getattr(processor, "do_resize", True) is False:
        return None
    from PIL import Image

    pixels = processor(Image.new("RGB", (512, 512)), return_tensors="pt")["pixel_values"]
    return tuple(pixels.shape[1:])


def _check_task(task: str, reducer: TokenReducer | None, budget: dict, positions: str | None) -> None:
    kind = TASKS[task]
    if reducer is not None and not isinstance(reducer, kind):
        takers = ", ".join(m for m in method_names() if issubclass(get_method(m), kind))
        raise TypeError(f"{reducer.name} is {reducer.kind}: the {task} pipeline takes {takers}")
    if kind is VisualTokenSelector and budget:
        raise TypeError(f"a FLOPs budget fits image encoders: the {task} pipeline takes keep")
    if kind is EncoderReducer and positions is not None:
        raise TypeError(f"positions applies to vision-language models (the image-text-to-text pipeline), not to {task}")


def _apply_arguments(kind: type[TokenReducer] | None = None) -> set[str]:
    """``apply``'s keywords and the native options of every method of ``kind`` (the task's; every method when the
    task is not given): given to ``pipeline`` directly, they would reach ``transformers.pipeline`` after the model
    loads and fail there (``r=2``: an unexpected keyword argument). Another kind's options go to
    ``transformers.pipeline``, which may take them: ``size=`` is MCTF's option and an image processor's keyword,
    which the image-text-to-text pipeline takes."""
    names = {name for name in inspect.signature(apply).parameters if name not in ("model", "options")}
    for method in method_names():
        if kind is None or issubclass(get_method(method), kind):
            names |= set(get_method(method).native_options)
    return names - set(inspect.signature(pipeline).parameters)
