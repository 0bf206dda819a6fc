"""``tokenprune eval-vlm``: answer accuracy of a vision-language model over a grid of methods and visual-token
budgets, beside what each configuration costs at prefill.

One run evaluates the unpruned baseline and every ``--method`` x ``--keep`` (or ``--tokens``) pair on the
same questions, with greedy generation (``--max-new-tokens``) in left-padded batches. Per configuration it
reports the accuracy, the retention (accuracy over the baseline's), the visual tokens the language model
received per image, the prefill GFLOPs per sample (counted on the first batch, logits of the last token
only) and the measured prefill time of that batch (median of ``--timing-repeats``; configurations are
timed one after another, not interleaved: ``tokenprune bench-vlm`` gives interleaved speed ratios).
Rows go to JSON lines (one per configuration, as soon as it finishes) and a CSV beside them; ``--resume``
skips finished configurations; ``--plot`` draws accuracy against visual tokens per image.

Data: a saved ``datasets`` folder (``save_to_disk``), a folder ``datasets.load_dataset`` reads (JSON
lines / CSV / parquet, or an image folder with metadata), or a datasets name. Columns: one or more image
columns (each an image or a list of images), a question, a reference answer (a string, a list of strings,
or VQAv2's list of ``{"answer": ...}``) and, for multiple choice, a list of options.

Metrics (``--metric``; ``auto`` picks ``choice`` when there is a choices column, ``vqa`` when the first
question has several reference answers, else ``exact``), on answers normalised as the VQA evaluation
does (lower case, punctuation and articles removed, number words as digits):

* ``exact``: 1 if the prediction equals one of the references;
* ``vqa``: min(#references equal to the prediction / 3, 1) (the VQA accuracy, without the official
  average over the 10 leave-one-out subsets of the 10 references);
* ``choice``: the options are listed as ``A. ...``; the option the prediction names (an option's whole text,
  else a letter alone or followed by '.', ')' or ':') is compared with the reference (a letter, an option's
  index, or an option's text).

An image that cannot be decoded skips its question, counted by reason (as ``tokenprune eval`` does).
``accelerate launch -m tokenprune.eval.vlm ...`` shards the questions over processes and gathers the
per-question scores exactly.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import Dataset

import tokenprune
from tokenprune import vlm_testbed
from tokenprune.cli import (
    ArgumentParser,
    add_device_arguments,
    add_option_argument,
    check_device,
    count,
    options_by_method,
    torch_dtype,
)

from .data import (
    decode_image,
    image_source,
    is_saved_dataset,
    load_saved_dataset,
    looks_like_path,
    pick_split,
    skip_reason,
)
from .evaluate import (
    Config,
    add_output_arguments,
    append_result,
    busy_note,
    configured,
    distinct,
    finished_results,
    format_skips,
    make_accelerator,
    output_paths,
    plot,
    run_settings,
    sweep,
    write_csv,
)

METRICS = ("auto", "exact", "vqa", "choice")
DEFAULT_KEEPS = (1 / 3, 2 / 9, 1 / 9)  # HiPrune's 192, 128 and 64 of LLaVA-1.5's 576 visual tokens
SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's VQA prompt
CHOICE_PROMPT = "\nAnswer with the option's letter from the given choices directly."  # LLaVA-1.5's MMBench prompt
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# ---------------------------------------------------------------- answers and metrics

_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"  # as the VQA evaluation's manualMap (and lmms-eval's) has it: "none" answers a count
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:']")


def normalize_answer(text: str) -> str:
    """An answer as the VQA evaluation compares it: lower case; commas inside numbers dropped ("1,000");
    a period kept only inside a number; other punctuation as a space; number words as digits; articles
    removed; single spaces."""
    text = text.lower().replace("\n", " ").replace("\t", " ").strip()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = re.sub(r"(?!(?<=\d)\.(?=\d))\.", " ", text)
    text = _PUNCTUATION.sub(" ", text)
    return " ".join(_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES)


def exact_match(prediction: str, answers: list[str]) -> float:
    return float(normalize_answer(prediction) in {normalize_answer(a) for a in answers})


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    said = normalize_answer(prediction)
    return min(sum(normalize_answer(a) == said for a in answers) / 3, 1.0)


def chosen_option(prediction: str, choices: list[str]) -> int | None:
    """The option a prediction names: an option's whole text (normalised), else a letter that is the whole answer
    or is followed by '.', ')' or ':' ("B", "b.", "(B) bag", "B: bag").

    The text comes first, and a letter followed by a space is no letter: "A blue car" is the option "A blue car",
    not option A (its article). lmms-eval's MMBench scorer (``can_infer_option``) distrusts a lone "A" in a longer
    answer for the same reason and takes letters marked by punctuation ("A.", "A)", "(A)", "A:"); its last resort,
    an option's text found anywhere in the answer, is left out: here only a whole option counts."""
    said = normalize_answer(prediction)
    if said:  # an answer of articles alone ("A") normalises to nothing: no option's text, but maybe a letter
        for i, choice in enumerate(choices):
            if normalize_answer(choice) == said:
                return i
    found = re.match(r"\(?([A-Za-z])(?:[.):]|$)", prediction.strip())
    if found and found.group(1).upper() in LETTERS[:len(choices)]:
        return LETTERS.index(found.group(1).upper())
    return None


def reference_option(answer, choices: list[str]) -> int:
    """The reference of a multiple-choice question as an option index: an index, a letter or an option's text."""
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return answer
    if isinstance(answer, str):
        text = answer.strip()
        if len(text) == 1 and text.upper() in LETTERS[:len(choices)]:
            return LETTERS.index(text.upper())
        said = normalize_answer(text)
        for i, c in enumerate(choices):
            if normalize_answer(c) == said:
                return i
    raise ValueError(f"the reference answer {answer!r} is neither an option's index, letter nor text "
                     f"(options: {choices})")


def answer_list(value) -> list[str]:
    """Reference answers from a column value: a string, a list of strings, or VQAv2's [{"answer": ...}]."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, list) and all(isinstance(v, dict) and "answer" in v for v in value):
        return [v["answer"] for v in value]
    raise ValueError(f"a reference answer must be a string, a list of strings or a list of {{'answer': ...}}, "
                     f"got {value!r}")


def score(metric: str, prediction: str, answer, choices: list[str] | None) -> float:
    if metric == "choice":
        return float(chosen_option(prediction, choices) == reference_option(answer, choices))
    answers = answer_list(answer)
    return vqa_accuracy(prediction, answers) if metric == "vqa" else exact_match(prediction, answers)


# ---------------------------------------------------------------- data


class Questions(Dataset):
    """The rows of a ``datasets`` split as questions: images decoded here (a corrupt one marks the question
    skipped, with its reason), the rest passed through."""

    def __init__(self, data, image_columns, question_column: str, answer_column: str,
                 choices_column: str | None) -> None:
        from datasets import Image as HFImage
        from datasets import Value

        columns = list(data.features)
        if not image_columns:
            image_columns = [k for k, f in data.features.items() if isinstance(f, HFImage)] or \
                [k for k in ("image", "images") if k in columns]
        for what, names in (("--image-column", image_columns), ("--question-column", [question_column]),
                            ("--answer-column", [answer_column]),
                            ("--choices-column", [choices_column] if choices_column else [])):
            missing = [n for n in names if n not in columns]
            if missing or (what == "--image-column" and not names):
                raise ValueError(f"{what} {' '.join(missing) or '(none found)'}: the data's columns are "
                                 f"{', '.join(columns)}")
        if choices_column and not isinstance(getattr(data.features[choices_column], "feature", None), Value):
            # a text (or anything but a list) read as list(...) gave its characters as the options
            raise ValueError(f"--choices-column {choices_column}: a list of options per question, got "
                             f"{data.features[choices_column]}")
        for name in image_columns:  # decoded here, so that a corrupt image skips one question, not the run
            feature = data.features[name]
            if isinstance(feature, HFImage):
                data = data.cast_column(name, HFImage(decode=False))
            elif isinstance(getattr(feature, "feature", None), HFImage):
                data = data.cast_column(name, type(feature)(HFImage(decode=False)))
        self.data, self.image_columns = data, list(image_columns)
        self.question_column, self.answer_column, self.choices_column = question_column, answer_column, choices_column

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        row = self.data[index]
        images, skip = [], 0
        for name in self.image_columns:
            for raw in row[name] if isinstance(row[name], list) else [row[name]]:
                image = decode_image(image_source(raw), "RGB")
                if isinstance(image, int):
                    skip = skip or image
                else:
                    images.append(image)
        return dict(index=index, images=images, skip=skip, question=row[self.question_column],
                    answer=row[self.answer_column],
                    choices=option_texts(row[self.choices_column], index) if self.choices_column else None)


def option_texts(options: list, index: int) -> list[str]:
    """A question's options as text: a number as written (``3`` -> "3"); missing options (None) at the end dropped
    (MMBench-style rows with fewer options than columns), a missing option before a present one refused (the
    letters after it would name other options)."""
    options = list(options)
    while options and options[-1] is None:
        options.pop()
    if None in options:
        raise ValueError(f"question {index}: option {LETTERS[options.index(None)]} is missing (None) before other "
                         f"options; the letters would shift: {options}")
    return [str(o) for o in options]


#: the VLM testbed's question sets: ``fashion-mnist-vqa`` from the packaged test split, ``:val`` from the last
#: 5,000 train images ($TOKENPRUNE_FMNIST_ROOT)
EMBEDDED_QUESTIONS = {"fashion-mnist-vqa": "test", "fashion-mnist-vqa:val": "val"}
EMBEDDED_QUESTION_COUNT = 2000


def load_questions(spec: str, split: str):
    """``spec``: an embedded question set, a saved ``datasets`` folder, a folder ``load_dataset`` reads, or a
    datasets name."""
    import datasets

    if spec in EMBEDDED_QUESTIONS:
        part = EMBEDDED_QUESTIONS[spec]
        where = "test split" if part == "test" else "validation split (the last 5,000 train images)"
        return (vlm_testbed.question_set(part, EMBEDDED_QUESTION_COUNT),
                f"{EMBEDDED_QUESTION_COUNT:,} questions on 2x2 mosaics of the Fashion-MNIST {where}")
    path = Path(spec).expanduser()
    if path.is_dir():
        if is_saved_dataset(path):
            data, which = load_saved_dataset(path, split)
            return data, f"{path} ({which})"
        try:
            data = datasets.load_dataset(str(path))
        except (OSError, ValueError) as e:  # EmptyDatasetError is a FileNotFoundError
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"--data {spec}: the folder does not load as a dataset ({first})") from e
        data, which = pick_split(data, split, path)
        return data, f"{path} ({which})"
    if path.exists():
        raise ValueError(f"--data {spec}: a file; expected a folder or a datasets name")
    if looks_like_path(spec):
        raise ValueError(f"--data {spec}: no such folder")
    try:
        return datasets.load_dataset(spec, split=split), f"{spec} ({split})"
    except (OSError, ValueError) as e:  # DatasetNotFoundError is a FileNotFoundError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--data {spec}: not a local folder, and no datasets name that loads ({first})") from e


def resolve_metric(metric: str, questions: Questions) -> str:
    if metric != "auto":
        if metric == "choice" and not questions.choices_column:
            raise ValueError("--metric choice needs the options: pass --choices-column")
        return metric
    if questions.choices_column:
        return "choice"
    first = questions.data[0][questions.answer_column] if len(questions) else ""
    return "vqa" if len(answer_list(first)) > 1 else "exact"


# ---------------------------------------------------------------- model and prompts


def load_vlm(name: str, dtype: torch.dtype):
    """The model and its processor from a local folder or a hub id, through the Auto classes
    (``trust_remote_code`` stays off: only architectures transformers itself has load)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(name).expanduser()
    if name == str(vlm_testbed.vlm_testbed_path()) and not path.is_dir():
        raise ValueError(f"the VLM testbed's weights are not in this installation ({path}); train them with: "
                         "python -m tokenprune.eval.train_vlm_testbed --data-root FASHION_MNIST_FOLDER")
    if not path.is_dir() and (path.exists() or looks_like_path(name)):
        raise ValueError(f"--model {name}: no such folder (a local model folder or a hub id)")
    try:
        processor = AutoProcessor.from_pretrained(str(path) if path.is_dir() else name)
        model = AutoModelForImageTextToText.from_pretrained(str(path) if path.is_dir() else name, dtype=dtype)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--model {name}: does not load as a vision-language model ({first})") from e
    processor.tokenizer.padding_side = "left"  # batched generation continues every prompt at its end
    return model.eval(), processor


def image_token_id(model) -> int:
    config = model.config
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(model).__name__}: its config names no image token (image_token_id)")


def prompt_text(processor, question: str, images: int, choices: list[str] | None, post_prompt: str,
                template: str | None) -> str:
    """The prompt of one question: the question, its options as ``A. ...`` lines, the post-prompt; inside the
    processor's chat template (images first, as LLaVA's and Qwen's evaluations place them) or ``template``
    (``{images}``: the processor's image token once per image; ``{question}``: the rest)."""
    text = question + "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices or [])) + post_prompt
    if template is not None:
        return template.replace("{images}", "\n".join([processor.image_token] * images)).replace("{question}", text)
    content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


# ---------------------------------------------------------------- one configuration


class Prompter:
    """Turns a batch of questions into processor inputs (the readable ones) and scores generations."""

    def __init__(self, processor, metric: str, post_prompt: str | None, template: str | None) -> None:
        if template is None and not getattr(processor, "chat_template", None):
            raise ValueError("the processor has no chat template: pass --prompt-template, e.g. "
                             "'USER: {images}\\n{question} ASSISTANT:'")
        if template is not None and "{question}" not in template:
            raise ValueError("--prompt-template must contain {question} (and {images} where the images go)")
        self.processor, self.metric, self.template = processor, metric, template
        self.post_prompt = post_prompt if post_prompt is not None else \
            CHOICE_PROMPT if metric == "choice" else SHORT_ANSWER_PROMPT

    def inputs(self, batch: list[dict]) -> dict | None:
        readable = [q for q in batch if not q["skip"]]
        if not readable:
            return None
        texts = [prompt_text(self.processor, q["question"], len(q["images"]), q["choices"], self.post_prompt,
                             self.template) for q in readable]
        images = [image for q in readable for image in q["images"]]
        return dict(self.processor(text=texts, images=images or None, return_tensors="pt", padding=True))


@torch.inference_mode()
def prefill_cost(model, inputs: dict, repeats: int, device: torch.device) -> tuple[float, float, float | None]:
    """(GFLOPs per sample, ms per batch, other processes' CPU share or None) of the prefill of ``inputs``: logits
    for the last position only, as ``generate`` computes them; the time is the median of ``repeats`` after one
    warm-up; the share is measured on CPU only (``evaluate.busy_note``)."""
    from tokenprune.timing import ForeignLoad, timed

    prefill = {**inputs, "logits_to_keep": 1}
    batch = inputs["input_ids"].shape[0]
    gflops = tokenprune.count_flops(model, inputs=prefill).flops / batch / 1e9
    model(**prefill)
    with ForeignLoad() as load:
        times = [timed(lambda: model(**prefill), device)[1] for _ in range(repeats)]
    return gflops, 1000 * statistics.median(times), load.value if device.type == "cpu" else None


@torch.inference_mode()
def evaluate_vlm_config(model, prompter: Prompter, loader, accelerator, max_new_tokens: int, dtype: torch.dtype,
                        timing_repeats: int) -> dict:
    from tqdm.auto import tqdm

    device = accelerator.device
    token_id = image_token_id(model)
    results: list[torch.Tensor] = []  # per question: score, images, visual tokens, skip code
    cost = None
    for batch in tqdm(loader, disable=not accelerator.is_main_process, leave=False, unit="batch"):
        inputs = prompter.inputs(batch)
        rows = torch.zeros(len(batch), 4, dtype=torch.float64)
        rows[:, 3] = torch.tensor([q["skip"] for q in batch], dtype=torch.float64)
        if inputs is not None:
            inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
            if cost is None:
                cost = prefill_cost(model, inputs, timing_repeats, device)
            generated = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
            answers = prompter.processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:],
                                                      skip_special_tokens=True)
            placeholders = (inputs["input_ids"] == token_id).sum(dim=1).tolist()
            visual = tokenprune.last_forward(model).visual_tokens if tokenprune.is_patched(model) else placeholders
            readable = [i for i, q in enumerate(batch) if not q["skip"]]
            for i, answer, tokens in zip(readable, answers, visual):
                q = batch[i]
                rows[i, :3] = torch.tensor([score(prompter.metric, answer, q["answer"], q["choices"]),
                                            len(q["images"]), tokens])
        results.append(accelerator.gather_for_metrics(rows.to(device)).cpu())
    table = torch.cat(results)
    read = table[table[:, 3] == 0]
    skipped = Counter(skip_reason(int(code)) for code in table[table[:, 3] < 0, 3].tolist())
    if len(read) == 0:
        raise ValueError(f"no readable questions in --data ({format_skips(dict(skipped))})")
    gflops, prefill_ms, foreign = cost if cost is not None else (None, None, None)
    return dict(accuracy=100 * float(read[:, 0].mean()), questions=len(read),
                visual_tokens_per_image=float(read[:, 2].sum() / read[:, 1].sum()) if read[:, 1].sum() else 0.0,
                prefill_gflops=gflops, prefill_ms=prefill_ms, skipped=sum(skipped.values()),
                skip_reasons=dict(sorted(skipped.items())),
                foreign_load=foreign if accelerator.num_processes == 1 else None)


# ---------------------------------------------------------------- results

COLUMNS = ["method", "keep", "options", "metric", "accuracy", "retention", "visual_tokens_per_image",
           "prefill_gflops", "prefill_ms", "questions", "skipped", "skip_reasons", "foreign_load"]


def with_retention(rows: list[dict]) -> list[dict]:
    base = next((r for r in rows if r["method"] is None), None)
    return [{**r, "retention": None if base is None or not base["accuracy"] else r["accuracy"] / base["accuracy"]}
            for r in rows]


def format_table(rows: list[dict]) -> str:
    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    names = [r["method"] or "baseline" for r in rows]
    options = [",".join(f"{k}={v}" for k, v in r["options"].items()) for r in rows]
    width, option_width = max([10, *map(len, names)]), max([7, *map(len, options)])
    head = (f"{'method':<{width}} {'keep':>6} {'options':<{option_width}} {'accuracy':>9} {'retention':>9} "
            f"{'tokens/img':>10} {'prefill GFLOPs':>14} {'prefill ms':>10}")
    lines = [head, "-" * len(head)]
    for r, name, opts in zip(rows, names, options):
        lines.append(f"{name:<{width}} {fmt(r['keep'], '>6.3f'):>6} {opts:<{option_width}} {r['accuracy']:>9.2f} "
                     f"{fmt(r['retention'], '>9.3f'):>9} {r['visual_tokens_per_image']:>10.1f} "
                     f"{fmt(r['prefill_gflops'], '>14.3f'):>14} {fmt(r['prefill_ms'], '>10.1f'):>10}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the command


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="tokenprune eval-vlm", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(vlm_testbed.vlm_testbed_path()),
                   help="a local model folder or hub id: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL or Qwen2.5-VL with its "
                        "processor (default: the packaged VLM testbed)")
    p.add_argument("--data", default="fashion-mnist-vqa",
                   help="'fashion-mnist-vqa' (the default: the VLM testbed's 2,000 test questions, built from the "
                        "packaged test split; ':val' for its validation questions), a saved datasets folder, a "
                        "folder datasets.load_dataset reads, or a datasets name")
    p.add_argument("--split", default="test", help="split of the data (default test)")
    p.add_argument("--image-column", nargs="+", help="image column(s) (default: every Image column, else 'image')")
    p.add_argument("--question-column", default="question")
    p.add_argument("--answer-column", default="answer",
                   help="reference answer(s): a string, a list of strings or VQAv2's [{'answer': ...}]")
    p.add_argument("--choices-column", help="a list of options: multiple choice (default: 'choices' if present)")
    p.add_argument("--metric", choices=METRICS, default="auto")
    p.add_argument("--method", nargs="+", default=["hiprune"],
                   help="methods to sweep (default hiprune; LLaVA-1.5 also takes the encoder methods on its tower)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", nargs="+", type=float, help="fractions of each image's visual tokens to keep "
                        "(default 1/3, 2/9, 1/9)")
    budget.add_argument("--tokens", nargs="+", type=count(1),
                        help="visual tokens per image to keep: on LLaVA-1.5 (a fixed count per image) that fraction "
                        "of them, for any method; elsewhere each selector's tokens= option (LLaVA-NeXT: the image's "
                        "budget, split over its crops)")
    add_option_argument(p)  # each method of the sweep gets the options it declares
    p.add_argument("--positions", choices=("reindex", "original"), help="how kept tokens are numbered "
                   "(default: the family's; tokenprune.apply)")
    p.add_argument("--max-new-tokens", type=count(1), default=16)
    p.add_argument("--post-prompt", help="text after the question (default: LLaVA-1.5's evaluation prompts: "
                   f"{SHORT_ANSWER_PROMPT.strip()!r}, or for multiple choice {CHOICE_PROMPT.strip()!r})")
    p.add_argument("--prompt-template", help="instead of the processor's chat template: a text with {images} "
                   "and {question}")
    p.add_argument("--batch-size", type=count(1), default=8)
    p.add_argument("--timing-repeats", type=count(1), default=3, help="timed prefills of the first batch")
    add_device_arguments(p, auto=True)
    p.add_argument("--limit", type=count(1), help="the first N questions only")
    p.add_argument("--threads", type=count(1), help="torch CPU threads")
    add_output_arguments(p, "runs/eval-vlm", "accuracy vs visual tokens")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    from tokenprune.patches.vlm import visual_tokens_per_image
    from torch.utils.data import DataLoader, Subset

    from tokenprune.registry import check_keep, get_method

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    notes = []  # printed below by the main process alone (the processes are not joined yet)
    methods = distinct(args.method, "--method", notes)
    keeps = [check_keep(k) for k in distinct(args.keep or ([] if args.tokens else DEFAULT_KEEPS), "--keep", notes)]
    tokens = distinct(args.tokens or [], "--tokens", notes)
    options = options_by_method(methods, args.option)
    for m in methods:  # a bad method or option value fails before any model loads
        get_method(m)(keep=1.0, **options[m])
        if args.tokens and options[m].get("tokens") is not None:  # the option would set every row's budget
            raise ValueError(f"--tokens and {m}'s option tokens={options[m]['tokens']} both set its visual tokens per "
                             "image: pass one of them")
    device = None if args.device == "auto" else check_device(args.device)
    dtype = torch_dtype(args.dtype)
    output, png = output_paths(args, "runs/eval-vlm", args.model, "tokenprune eval-vlm")

    data, data_desc = load_questions(args.data, args.split)
    choices_column = args.choices_column or ("choices" if "choices" in data.features else None)
    questions = Questions(data, args.image_column, args.question_column, args.answer_column, choices_column)
    metric = resolve_metric(args.metric, questions)
    model, processor = load_vlm(args.model, dtype)
    prompter = Prompter(processor, metric, args.post_prompt, args.prompt_template)
    per_image = visual_tokens_per_image(model) if args.tokens else None
    if args.tokens and per_image is None:
        # each image has as many visual tokens as its size calls for (LLaVA-NeXT, Qwen): the budget in tokens is the
        # selector's own option, an image's (LLaVA-NeXT: split over its crops), not a fraction
        lacking = [m for m in methods if "tokens" not in get_method(m).native_options]
        if lacking:
            raise ValueError(f"--tokens: {type(model).__name__} gives each image as many visual tokens as its size "
                             f"calls for, and {lacking[0]} takes no budget in tokens; pass --keep (a fraction of each "
                             "image's tokens)")
        configs = [Config(None, None)] + [Config(m, None, {**options[m], "tokens": t}) for m in methods for t in tokens]
    else:
        if args.tokens:  # a fixed count per image (LLaVA-1.5): each budget is that fraction, for any method
            too_many = [t for t in tokens if t > per_image]
            if too_many:
                raise ValueError(f"--tokens {too_many[0]}: each image has {per_image} visual tokens")
            keeps = [t / per_image for t in tokens]
        configs = sweep(methods, keeps, options, notes)

    accelerator = make_accelerator(device)
    for note in notes:
        accelerator.print(note)
    model.to(accelerator.device)
    image_columns, samples = questions.image_columns, len(questions)  # the whole data's, before --limit
    if args.limit:
        questions = Subset(questions, range(min(args.limit, len(questions))))
    loader = accelerator.prepare(DataLoader(questions, batch_size=args.batch_size, collate_fn=list))

    finished = finished_results(args, output, png, accelerator, "tokenprune eval-vlm")

    # the packaged testbed by its name, not by where this installation keeps it
    name = vlm_testbed.VLM_TESTBED if args.model == str(vlm_testbed.vlm_testbed_path()) else args.model
    # the columns as resolved: another answer, question or choices column is another question set
    run = dict(model=name, data=args.data, split=args.split, limit=args.limit, samples=samples, metric=metric,
               image_columns=image_columns, question_column=args.question_column, answer_column=args.answer_column,
               choices_column=choices_column, max_new_tokens=args.max_new_tokens, post_prompt=prompter.post_prompt,
               prompt_template=args.prompt_template, positions=args.positions, dtype=args.dtype,
               **run_settings(args, accelerator))
    settings = {"positions": args.positions} if args.positions else {}
    for config in configs[1:]:  # every configuration fits this model (layers, budgets), before any evaluation
        tokenprune.remove(tokenprune.apply(model, config.method, keep=config.keep, **settings, **config.options))
    rows = []
    for config, key in configured(model, configs, run, finished, rows, accelerator, **settings):
        accelerator.print(config.label)
        row = dict(key=key, model=name, data=data_desc, method=config.method, keep=config.keep,
                   options=config.options, metric=metric,
                   **evaluate_vlm_config(model, prompter, loader, accelerator, args.max_new_tokens, dtype,
                                         args.timing_repeats))
        if accelerator.is_main_process:
            append_result(output, row)
            write_csv(output.with_suffix(".csv"), with_retention(rows + [row]), COLUMNS)
        rows.append(row)
    rows = with_retention(rows)
    if accelerator.is_main_process:
        write_csv(output.with_suffix(".csv"), rows, COLUMNS)
        print(f"\n{name} on {data_desc}, metric {metric}" + (f", first {args.limit}" if args.limit else ""))
        print(format_table(rows))
        if (note := busy_note(rows, "prefill ms", "bench-vlm")) is not None:
            print(note)
        if rows[0]["skipped"]:
            print(format_skips(rows[0]["skip_reasons"]))
        print(f"results: {output} and {output.with_suffix('.csv')}")
        if png is not None:
            plot(png, rows, f"{Path(name).name} on {data_desc}", "visual_tokens_per_image", "accuracy",
                 ("visual tokens per image (received by the language model)", "accuracy (%)"))
            print(f"plot: {png}")
    return rows


if __name__ == "__main__":
    from tokenprune.cli import main as cli_main

    sys.exit(cli_main(["eval-vlm", *sys.argv[1:]]))
