"""The vision towers the plugin serves, as vLLM builds them, read from the model's config alone.

The settings (``hf_overrides["tokenprune"]``) are checked against them twice: in the API process, when vLLM
resolves the architecture (``tokenprune.vllm.refusing_unserved``), where a ValueError reaches the caller as it is;
and in each worker, before any weight loads, where vLLM reports a failure only as "Engine core initialization
failed" (the reason in its log). This module imports no vLLM model code, so the API process does not either.
"""
from __future__ import annotations

from ..patches.vlm_llava import Llava
from ..patches.vlm_qwen import Qwen25VL
from ..registry import VisionTower


def llava_tower(hf_config) -> VisionTower:
    """LLaVA's CLIP tower as vLLM builds it: only up to ``vision_feature_layer``, whose output the language model
    receives (vLLM's ``get_layer_index``: a negative index counts from the end, -1 being the last layer). ValueError
    for a LLaVA the plugin does not serve."""
    vision = hf_config.vision_config
    if vision.model_type != "clip_vision_model":  # the hooks are tested on vLLM's CLIP only
        raise ValueError(f"tokenprune serves LLaVA with a CLIP vision tower in vLLM, not {vision.model_type!r}")
    layer = hf_config.vision_feature_layer
    if not isinstance(layer, int):  # as tokenprune.apply refuses it in transformers
        raise ValueError(f"tokenprune needs one vision_feature_layer (an int), as LLaVA-1.5; got {layer!r}: "
                         "features of several layers are not scored by one")
    if hf_config.vision_feature_select_strategy != "default":
        raise ValueError("tokenprune needs vision_feature_select_strategy='default' (the features without the "
                         "class token), as LLaVA-1.5")
    layers = vision.num_hidden_layers
    built = layers + layer + 1 if layer < 0 else layer
    return VisionTower(family=Llava.name, depth=built, output_layer=built - 1,
                       object_layer=Llava.default_object_layer, unbuilt_layers=layers - built)


def qwen_tower(hf_config) -> VisionTower:
    """Qwen2.5-VL's tower as vLLM builds it: every block, the last one's output merged for the language model; the
    blocks of ``fullatt_block_indexes`` attend over the whole image, the others within windows."""
    vision = hf_config.vision_config
    return VisionTower(family=Qwen25VL.name, depth=vision.depth, output_layer=vision.depth - 1,
                       object_layer=Qwen25VL.default_object_layer,
                       full_attention_layers=tuple(vision.fullatt_block_indexes))


#: vLLM's registry name of each architecture the plugin serves -> its tower (tokenprune.vllm.ARCHITECTURES)
TOWERS = {"LlavaForConditionalGeneration": llava_tower, "Qwen2_5_VLForConditionalGeneration": qwen_tower}


def built_as_expected(tower: VisionTower, built: int) -> None:
    """Raise RuntimeError where vLLM built another number of layers than ``tower`` says (a vLLM the plugin was not
    written for): the recorded layers would be other ones than the settings name."""
    if built != tower.depth:
        raise RuntimeError(f"tokenprune: vLLM built {built} layers of {tower.family}'s vision tower where the plugin "
                           f"expects {tower.depth}: this vLLM builds its towers otherwise than the plugin supports")
