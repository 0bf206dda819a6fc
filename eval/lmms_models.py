"""The lmms-eval model classes of the tokenprune plugin (``lmms_plugin`` registers them): lmms-eval's own
``llava_hf`` and ``qwen2_5_vl`` with ``tokenprune.apply`` after loading; see ``lmms_plugin`` for the usage."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from lmms_eval.models.simple.llava_hf import LlavaHf
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL

import tokenprune

OPTION_NAMES = ("alpha", "object_layer", "wrap", "seed", "r", "prop_attn")  # forwarded to the method if it has them


class PruningStats:
    """Visual tokens per image and prefill seconds, from the patched model's report after each ``generate``."""

    def __init__(self) -> None:
        self.images = self.placeholders = self.visual_tokens = 0
        self.prefill_seconds: list[float] = []

    def summary(self, method: str, keep, tokens) -> dict:
        return dict(method=method, keep=keep, tokens=tokens, images=self.images,
                    placeholders_per_image=self.placeholders / self.images if self.images else None,
                    visual_tokens_per_image=self.visual_tokens / self.images if self.images else None,
                    prefill_ms_median=1000 * statistics.median(self.prefill_seconds) if self.prefill_seconds else None,
                    generate_calls=len(self.prefill_seconds))


class _Pruned:
    """Mixed into an lmms-eval model class: patch after loading, watch each ``generate``, report after
    ``generate_until`` (once per run: lmms-eval gives it every task's requests at once)."""

    def __init__(self, **kwargs) -> None:
        ours, rest = _split(kwargs)
        super().__init__(**rest)  # lmms-eval's class loads the model and its processor
        self._prune(**ours)

    def _prune(self, method: str, keep, tokens, positions, stats_file, options: dict) -> None:
        self._method, self._keep, self._tokens = method, keep, tokens
        self._stats_file = stats_file
        self._stats, self._error = PruningStats(), None
        model = self._model
        if method != "none":
            chosen = {k: v for k, v in options.items() if v is not None}
            if tokens is not None:  # as lmms-eval parsed it: apply refuses a fraction (64.7) instead of rounding it
                chosen["tokens"] = tokens
            tokenprune.apply(model, method, keep=None if keep is None else float(keep),
                             **({"positions": positions} if positions else {}), **chosen)
        token_id = model.config.image_token_id
        language_model = model.model.language_model
        started = {}

        def generate(*args, **kwargs):
            started["at"] = time.perf_counter()
            try:
                return type(model).generate(model, *args, **kwargs)
            except Exception as error:  # lmms-eval would score it as an empty answer
                self._error = self._error or error
                raise
            finally:
                report = tokenprune.last_forward(model) if tokenprune.is_patched(model) else None
                ids = kwargs.get("input_ids")
                images = kwargs.get("pixel_values")
                if ids is not None and images is not None:
                    count = int((ids == token_id).sum())
                    self._stats.placeholders += count
                    self._stats.visual_tokens += sum(report.visual_tokens) if report else count
                    self._stats.images += _image_count(kwargs)

        def time_prefill(module, args, kwargs, output):
            if "at" in started:  # the first forward of this generate: the prefill (images encoded before it)
                if torch.cuda.is_available() and next(module.parameters()).is_cuda:
                    torch.cuda.synchronize()
                self._stats.prefill_seconds.append(time.perf_counter() - started.pop("at"))

        model.generate = generate
        language_model.register_forward_hook(time_prefill, with_kwargs=True)

    def generate_until(self, requests):
        self._stats, self._error = PruningStats(), None  # each call reports its own requests
        answers = super().generate_until(requests)
        if self._error is not None:
            raise RuntimeError(f"tokenprune: generate failed ({self._error}); no answer was scored") from self._error
        summary = self._stats.summary(self._method, self._keep, self._tokens)
        print(f"tokenprune: {json.dumps(summary)}", flush=True)
        if self._stats_file:
            Path(self._stats_file).write_text(json.dumps(summary, indent=2) + "\n")
        return answers


def _image_count(kwargs) -> int:
    if kwargs.get("image_grid_thw") is not None:  # Qwen: one grid row per image
        return int(kwargs["image_grid_thw"].shape[0])
    return int(kwargs["pixel_values"].shape[0])  # LLaVA: one image per row (LLaVA-NeXT: crops inside)


def _split(kwargs: dict) -> tuple[dict, dict]:
    """(tokenprune's arguments, the base class's)."""
    ours = {k: kwargs.pop(k, None) for k in ("method", "keep", "tokens", "positions", "stats_file")}
    ours["options"] = {k: kwargs.pop(k) for k in OPTION_NAMES if k in kwargs}
    ours["method"] = ours["method"] or "hiprune"
    # lmms-eval's default device_map "" is refused by transformers 5: load onto the device asked for
    if not kwargs.get("device_map"):
        kwargs["device_map"] = kwargs.get("device", "cuda")
    return ours, kwargs


class TokenpruneLlava(_Pruned, LlavaHf):
    """lmms-eval's ``llava_hf`` (LLaVA-1.5, LLaVA-NeXT) with tokenprune applied."""


class TokenpruneQwen2_5_VL(_Pruned, Qwen2_5_VL):  # noqa: N801  (lmms-eval's class name)
    """lmms-eval's ``qwen2_5_vl`` with tokenprune applied (HiPrune keeps the original M-RoPE positions)."""
