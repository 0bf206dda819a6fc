"""tokenprune in vLLM: HiPrune (or random selection) of LLaVA-1.5's and Qwen2.5-VL's visual tokens, through
vLLM's own plugin mechanism (the ``vllm.general_plugins`` entry point, which vLLM loads in every one of its
processes).

    pip install "tokenprune-vit[vllm]"
    from vllm import LLM
    llm = LLM("llava-hf/llava-1.5-7b-hf", hf_overrides={"tokenprune": {"method": "hiprune", "keep": 1 / 3}})

Without ``hf_overrides["tokenprune"]`` the model is vLLM's own, untouched; ``TOKENPRUNE_VLLM=0`` (or
``false``, ``off``, ``no``) keeps the plugin from registering at all. How it works, what is refused and why:
``docs/vllm.md``.
"""
from __future__ import annotations

import functools
import os

#: the architectures the plugin serves: vLLM's registry name -> our subclass ("module:Class", imported lazily
#: by vLLM, so that registering in the API process does not import the model code)
ARCHITECTURES = {"LlavaForConditionalGeneration": "tokenprune.vllm.llava:TokenpruneLlava",
                 "Qwen2_5_VLForConditionalGeneration": "tokenprune.vllm.qwen:TokenpruneQwen25VL"}

#: the values of TOKENPRUNE_VLLM that keep the plugin from registering
DISABLED = ("0", "false", "off", "no")


def register() -> None:
    """The entry point: replace the served architectures by subclasses that prune when configured, and refuse
    the settings where vLLM resolves another architecture (``refusing_unserved``)."""
    if os.environ.get("TOKENPRUNE_VLLM", "1").strip().lower() in DISABLED:
        return
    from vllm import ModelRegistry

    for architecture, target in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)
    if not getattr(ModelRegistry.inspect_model_cls, "refuses_unserved", False):
        ModelRegistry.inspect_model_cls = refusing_unserved(ModelRegistry.inspect_model_cls)


def refusing_unserved(inspect_model_cls):
    """vLLM's architecture lookup (``ModelRegistry.inspect_model_cls(architectures, model_config)``, which
    ``ModelConfig`` calls once ``hf_overrides`` are in ``model_config.hf_config``), raising ValueError where
    ``hf_overrides["tokenprune"]`` is set and the architecture vLLM resolved is none of ours (LLaVA-NeXT, Qwen2-VL, a
    text model, or LLaVA with ``model_impl="transformers"``): that model would serve every visual token, unpruned,
    whatever the settings said. Where it serves one, the settings are checked against its vision tower here too
    (``towers.TOWERS``): a worker's ValueError reaches the caller only as "Engine core initialization
    failed"."""

    @functools.wraps(inspect_model_cls)
    def inspect(architectures, model_config):
        info, architecture = inspect_model_cls(architectures, model_config)
        hf_config = getattr(model_config, "hf_config", None)
        if getattr(hf_config, "tokenprune", None) is not None:
            if architecture not in ARCHITECTURES:
                raise ValueError(f"tokenprune: hf_overrides['tokenprune'] is set, but vLLM serves this model as "
                                 f"{architecture}, which the plugin does not prune (it prunes "
                                 f"{' and '.join(ARCHITECTURES)}, vLLM's own implementations): it would answer "
                                 "unpruned. Drop the setting, or prune with transformers (tokenprune.apply)")
            from .selection import selector_from
            from .towers import TOWERS

            # here, where the caller sees the reason, not only a worker
            selector_from(hf_config).check(TOWERS[architecture](hf_config))
        return info, architecture

    inspect.refuses_unserved = True
    return inspect
