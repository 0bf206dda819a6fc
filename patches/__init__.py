"""Framework adapters: each teaches tokenprune to patch one model family (``tokenprune.adapters.Adapter``).

Importing this package registers them all; ``tokenprune`` imports it once. The reducing block step
they share is ``tokenprune.block``; the attention plumbing the transformers adapters share is
``hf_attention``; the VLM adapter (``vlm``) keeps one file per VLM family (``vlm_*.py``).
"""
from . import hf_vision, timm_vit, vlm, vlm_llava, vlm_llava_next, vlm_qwen  # noqa: F401  (registration)
