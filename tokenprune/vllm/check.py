"""The same prompts through tokenprune's transformers adapter and through vLLM with the plugin: the kept token
indices of every image, the visual tokens vLLM's prompts hold, and the greedy tokens, compared one by one.

    <vllm venv>/bin/python -m tokenprune.vllm.check --model FOLDER --method hiprune --keep 0.3333
    # no --model: a random-init copy of the VLM testbed's architecture (tokenprune.vlm_testbed), saved to a
    # temporary folder; prompts: the testbed's questions on test-split mosaics

Exit status 0 when everything matches, 1 otherwise (the first differences are printed). Both sides run in
float32 on the CPU, so HiPrune's top-k sees the same scores (vLLM's kernels in bf16 would rank near-ties
differently).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .selection import selector_for

#: float32 on both sides: the log-probabilities agree to rounding, far below this, unless an input differs
LOGPROB_TOLERANCE = 1e-4


@dataclass
class Comparison:
    prompts: int
    settings: dict
    visual_tokens: list[int] = field(default_factory=list)  # per prompt, as vLLM's prompt holds them
    budget: list[int] = field(default_factory=list)          # per prompt, the selector's budget
    kept_equal: list[bool] = field(default_factory=list)
    tokens_equal: list[bool] = field(default_factory=list)
    #: per prompt, the largest difference between the two engines' log-probabilities of the greedy tokens (where
    #: the tokens are equal). Greedy tokens of a random model can be blind to what went in (positions above all);
    #: their log-probabilities are not
    logprob_gap: list[float] = field(default_factory=list)
    transformers_tokens: list[list[int]] = field(default_factory=list)
    vllm_tokens: list[list[int]] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (self.visual_tokens == self.budget and all(self.kept_equal) and all(self.tokens_equal)
                and len(self.tokens_equal) == self.prompts and max(self.logprob_gap) <= LOGPROB_TOLERANCE)


#: the sizes (width, height) Qwen's prompts cycle through: token grids of 7x7, 10x6 and 8x12 (patch 4, 2x2 merger)
QWEN_IMAGE_SIZES = ((56, 56), (80, 48), (64, 96))


def testbed_prompts(processor, n: int, sizes=None, two_images: bool = False) -> list[tuple[str, object]]:
    """``n`` (prompt, PIL image) pairs: the testbed's questions about test-split mosaics, in the chat template;
    ``sizes``: (width, height) the images are resized to in turn (Qwen's native resolution), else 56x56;
    ``two_images``: the last prompt asks about two images (a list), the text after each at its own position."""
    from tokenprune import vlm_testbed as vt
    from tokenprune.eval.vlm import prompt_text

    questions = vt.question_set("test", n + two_images)
    images = [q["image"] if sizes is None else q["image"].resize(sizes[i % len(sizes)])
              for i, q in enumerate(questions)]
    prompts = [(prompt_text(processor, q["question"] + " " * (i % 3), 1, None, vt.POST_PROMPT, None), image)
               for i, (q, image) in enumerate(zip(questions, images))]  # trailing spaces: different lengths
    if two_images:
        prompts[-2:] = [(prompt_text(processor, questions[-1]["question"], 2, None, vt.POST_PROMPT, None),
                         images[-2:])]
    return prompts


def save_random_testbed(folder: Path, seed: int = 0, legacy_layout: bool = False) -> Path:
    """A random-init model of the VLM testbed's architecture with its processor, as a local folder.
    ``legacy_layout``: the tower's weights named as transformers 4 saved them (``vision_tower.vision_model.*``),
    the only layout vLLM's own LLaVA loads."""
    from safetensors.torch import load_file, save_file
    from transformers import LlavaForConditionalGeneration

    from tokenprune import vlm_testbed as vt

    torch.manual_seed(seed)
    LlavaForConditionalGeneration(vt.vlm_testbed_config()).save_pretrained(folder)
    vt.vlm_testbed_processor().save_pretrained(folder)
    if legacy_layout:
        weights = load_file(folder / "model.safetensors")
        save_file({k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.")
                   and not k.startswith("vision_tower.vision_model.") else k: v for k, v in weights.items()},
                  folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def save_random_qwen(folder: Path, seed: int = 0) -> Path:
    """A random-init tiny Qwen2.5-VL with the testbed's words and a processor keeping images between 16x16 and
    96x96 px (``vlm_testbed.random_qwen25vl``), as a local folder. Its tower has 4 blocks: HiPrune's object
    layer must be 2 (a full-attention block)."""
    from tokenprune import vlm_testbed as vt

    model, processor = vt.random_qwen25vl(vt.WORDS, min_pixels=16 * 16, max_pixels=96 * 96, seed=seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def is_qwen(folder) -> bool:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder).model_type == "qwen2_5_vl"


def transformers_side(folder, settings: dict, prompts, max_new_tokens: int):
    """Per prompt, from transformers with ``tokenprune.apply``, one prompt at a time: the greedy tokens and their
    log-probabilities, the indices each image kept, the image inputs, and the selector's budget (the visual
    tokens the prompt should hold). A prompt's image may be a list of images."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import tokenprune

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    options = dict(settings)
    tokenprune.apply(model, options.pop("method", "hiprune"), **options)
    selector = selector_for(settings)
    tokens, logprobs, kept, images, budget = [], [], [], [], []
    for text, image in prompts:
        inputs = processor(images=image, text=text, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        new = out.sequences[0, inputs["input_ids"].shape[1]:]
        tokens.append(new.tolist())
        logprobs.append([float(step[0].log_softmax(-1)[t]) for step, t in zip(out.scores, new)])
        report = tokenprune.last_forward(model)
        kept.append([image.nonzero().flatten().tolist() for image in report.kept])
        budget.append(sum(selector.budget(len(image)) for image in report.kept))
        images.append({k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")})
    return tokens, logprobs, kept, images, budget


def engine(folder, settings: dict | None):
    """A vLLM engine on ``folder`` in float32 on the CPU; ``settings``: the plugin's (None: not configured)."""
    from vllm import LLM

    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model ships a function to the workers
    overrides = {} if settings is None else {"tokenprune": settings}
    return LLM(str(folder), hf_overrides=overrides, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
               gpu_memory_utilization=0.1)


def greedy(llm, prompts, max_new_tokens: int) -> tuple[list[list[int]], list[int], list[list[float]]]:
    """Greedy tokens of all prompts in one ``generate`` (batched by vLLM), each prompt's visual tokens, and the
    log-probabilities of the greedy tokens."""
    from vllm import SamplingParams

    outputs = llm.generate(_requests(prompts), SamplingParams(temperature=0.0, max_tokens=max_new_tokens, logprobs=0),
                           use_tqdm=False)
    config = llm.llm_engine.model_config.hf_config
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    return ([list(o.outputs[0].token_ids) for o in outputs],
            [sum(t == image_id for t in o.prompt_token_ids) for o in outputs],
            [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outputs])


def vllm_side(folder, settings: dict, prompts, max_new_tokens: int, images: list[dict]):
    """Greedy tokens, visual tokens per prompt and kept indices per image, from vLLM with the plugin."""
    llm = engine(folder, settings)
    tokens, visual, logprobs = greedy(llm, prompts, max_new_tokens)
    (kept,) = llm.apply_model(functools.partial(_kept_indices, images))
    return tokens, visual, logprobs, kept


def throughput(folder, settings: dict, prompts, max_new_tokens: int, repeats: int = 3) -> dict:
    """Requests per second of vLLM with the plugin configured and not, two engines side by side, their
    ``generate`` calls interleaved (medians over ``repeats``), and the prompt tokens per request of each."""
    import statistics

    from vllm import SamplingParams

    engines = {"unpruned": engine(folder, None), "pruned": engine(folder, settings)}
    rates = {name: [] for name in engines}
    tokens = {}
    for name, llm in engines.items():  # warm-up, and the prompt sizes
        tokens[name] = statistics.mean(
            len(o.prompt_token_ids) for o in llm.generate(_requests(prompts), use_tqdm=False))
    for _ in range(repeats):
        for name, llm in engines.items():
            start = time.perf_counter()
            llm.generate(_requests(prompts), SamplingParams(temperature=0.0, max_tokens=max_new_tokens,
                                                            ignore_eos=True), use_tqdm=False)
            rates[name].append(len(prompts) / (time.perf_counter() - start))
    median = {name: statistics.median(r) for name, r in rates.items()}
    return dict(requests=len(prompts), max_new_tokens=max_new_tokens, repeats=repeats,
                requests_per_s=median, prompt_tokens_per_request=tokens,
                speedup=median["pruned"] / median["unpruned"])


def _requests(prompts) -> list[dict]:
    return [{"prompt": text, "multi_modal_data": {"image": image}} for text, image in prompts]


def served_class(model) -> str:
    """The class of the model vLLM serves (through ``LLM.apply_model``)."""
    return type(model).__name__


def _kept_indices(images: list[dict], model) -> list[list[int]]:
    """Runs in vLLM's worker (module level, so that it pickles by name): each prompt's images, one prompt at a
    time."""
    return [[kept.tolist() for kept in model.tokenprune_kept(**inputs)] for inputs in images]


def compare(folder, settings: dict, prompts, max_new_tokens: int = 4) -> Comparison:
    settings = dict(settings)
    selector_for(settings)  # bad settings fail here, before either engine loads
    result = Comparison(prompts=len(prompts), settings=settings)
    start = time.time()
    hf_tokens, hf_logprobs, hf_kept, images, budget = transformers_side(folder, settings, prompts, max_new_tokens)
    result.seconds["transformers"] = round(time.time() - start, 1)
    start = time.time()
    vllm_tokens, visual, vllm_logprobs, vllm_kept = vllm_side(folder, settings, prompts, max_new_tokens, images)
    result.seconds["vllm"] = round(time.time() - start, 1)
    result.visual_tokens = visual
    result.budget = budget
    result.kept_equal = [a == b for a, b in zip(hf_kept, vllm_kept)]
    result.tokens_equal = [a == b for a, b in zip(hf_tokens, vllm_tokens)]
    result.logprob_gap = [max(abs(x - y) for x, y in zip(a, b)) for a, b in zip(hf_logprobs, vllm_logprobs)]
    result.transformers_tokens, result.vllm_tokens = hf_tokens, vllm_tokens
    return result


def settings_of(method: str, keep: float, object_layer: int | None, random_qwen: bool) -> dict:
    """The plugin's settings for a comparison: ``object_layer`` where given, else 2 on the random Qwen (4 vision
    blocks: the family's default, 16, lies past them) for a method that takes one (HiPrune; random-select does not)."""
    from tokenprune.registry import get_method

    settings = {"method": method, "keep": keep}
    if object_layer is not None or (random_qwen and "object_layer" in get_method(method).native_options):
        settings["object_layer"] = 2 if object_layer is None else object_layer
    return settings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local LLaVA-1.5 or Qwen2.5-VL folder (default: a random-init model of --family)")
    p.add_argument("--family", choices=("llava", "qwen"), default="llava",
                   help="the random model without --model: the VLM testbed's LLaVA architecture, or a tiny "
                        "Qwen2.5-VL (4 vision blocks; object layer 2 unless --object-layer)")
    p.add_argument("--method", default="hiprune")
    p.add_argument("--keep", type=float, default=1 / 3)
    p.add_argument("--object-layer", type=int, help="HiPrune's object layer (1-based; default: the family's)")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--json", help="write the comparison here")
    p.add_argument("--throughput", type=int, default=0, metavar="N",
                   help="also time N requests through vLLM with the plugin configured and not (requests/s, "
                        "medians of 3 interleaved runs)")
    args = p.parse_args(argv)
    from transformers import AutoProcessor

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            folder = Path(args.model)
        else:
            folder = (save_random_qwen if args.family == "qwen" else save_random_testbed)(Path(tmp) / "model")
        qwen = is_qwen(folder)
        settings = settings_of(args.method, args.keep, args.object_layer, random_qwen=qwen and not args.model)
        sizes = QWEN_IMAGE_SIZES if qwen else None
        prompts = testbed_prompts(AutoProcessor.from_pretrained(folder), args.prompts, sizes, two_images=True)
        result = compare(folder, settings, prompts, args.max_new_tokens)
        report = {**asdict(result), "ok": result.ok}
        if args.throughput:
            many = testbed_prompts(AutoProcessor.from_pretrained(folder), args.throughput, sizes)
            report["throughput"] = throughput(folder, settings, many, args.max_new_tokens)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("settings", "visual_tokens", "budget", "kept_equal", "tokens_equal",
                                             "logprob_gap", "seconds", "ok", "throughput") if k in report}))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
