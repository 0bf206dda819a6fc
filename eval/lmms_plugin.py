"""tokenprune in lmms-eval, through lmms-eval's own plugin mechanism (the ``lmms_eval.models`` entry points):

    pip install "tokenprune-vit[vlm-eval]"
    lmms-eval --model tokenprune_llava --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=hiprune,keep=0.333 \\
        --tasks mme --batch_size 1
    lmms-eval --model tokenprune_qwen2_5_vl --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,tokens=64 ...

Each model is lmms-eval's own (``llava_hf``, ``qwen2_5_vl``): same loading, prompts and generation, so the
scores stand beside lmms-eval's published unpruned ones. The only differences: after loading, the model is
patched with ``tokenprune.apply`` (``method`` default ``hiprune``, ``keep`` or ``tokens``, ``positions`` and the
method's own options, e.g. ``object_layer``, ``alpha``, ``seed``), and when the run's generation ends the visual
tokens the language model received per image and the median prefill time are printed (and written as JSON to
``stats_file`` when given): lmms-eval generates for every task of a run in one ``generate_until`` call, so these
cover all the run's tasks together, not each one. ``method=none`` runs the stock model through the same code, for
a baseline.
``tokens`` is a budget per image, as ``tokenprune.apply`` takes it: LLaVA-NeXT splits it over the image's crops,
and the visual tokens it reports count the row newlines kept besides.

lmms-eval catches every error of ``generate`` and records an empty answer; an error tokenprune raises inside
``generate`` is raised again here once ``generate_until`` returns, never scored as a wrong answer.
"""
from __future__ import annotations


def manifests():
    """The ``lmms_eval.models`` entry point: lmms-eval's registry reads the model ids from here while it is
    being built, so this module imports nothing of lmms-eval's models; the classes live in ``lmms_models``,
    imported when a run asks for one."""
    from lmms_eval.models.registry_v2 import ModelManifest

    where = __name__.rsplit(".", 1)[0] + ".lmms_models"
    return [ModelManifest(model_id="tokenprune_llava", simple_class_path=f"{where}.TokenpruneLlava"),
            ModelManifest(model_id="tokenprune_qwen2_5_vl", simple_class_path=f"{where}.TokenpruneQwen2_5_VL")]


