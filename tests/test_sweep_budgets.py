"""A sweep's budgets: a method whose options set its token counts (``r``, ``fast``, ``keep_rates``, ``tokens``) is
evaluated once, with no keep, where each keep would have repeated it under a keep it does not use; and
``tokenprune eval-vlm --tokens`` on a model whose images have as many visual tokens as their size calls for
(LLaVA-NeXT) is each selector's own ``tokens=`` budget, as ``tokenprune.apply`` takes it."""
from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from PIL import Image
from test_eval_cli import make_folder
from test_eval_vlm import QUESTIONS, WORDS, png_bytes, save_questions, tiny_towers
from tokenprune.eval.evaluate import Config, budget_label, sweep
from tokenprune.eval.evaluate import main as evaluate

import tokenprune
from tokenprune.cli import main as cli
from tokenprune.vlm_testbed import CHAT_TEMPLATE, IMAGE, word_tokenizer

# ---------------------------------------------------------------- the configurations


def test_a_method_whose_options_set_its_counts_is_one_configuration_without_a_keep():
    notes = []
    options = {"tome": {"r": 2}, "mctf": {"fast": True}, "zero-tprune": {"keep_rates": [0.5]},
               "hiprune": {"tokens": 8, "object_layer": 2}, "random": {"seed": 3}, "random-select": {"tokens": None}}
    configs = sweep(list(options), [0.5, 0.25], options, notes)
    assert configs == [Config(None, None), Config("tome", None, {"r": 2}), Config("mctf", None, {"fast": True}),
                       Config("zero-tprune", None, {"keep_rates": [0.5]}),
                       Config("hiprune", None, {"tokens": 8, "object_layer": 2}),
                       Config("random", 0.5, {"seed": 3}), Config("random", 0.25, {"seed": 3}),
                       Config("random-select", 0.5, {"tokens": None}),
                       Config("random-select", 0.25, {"tokens": None})]
    assert notes == ["note: tome: r=2 sets its token counts, not --keep: evaluated once",
                     "note: mctf: fast=True sets its token counts, not --keep: evaluated once",
                     "note: zero-tprune: keep_rates=[0.5] sets its token counts, not --keep: evaluated once",
                     "note: hiprune: tokens=8 sets its token counts, not --keep: evaluated once"]
    # r=0 sets the counts too (nothing removed); fast=False does not
    assert sweep(["tome", "mctf"], [0.5], {"tome": {"r": 0}, "mctf": {"fast": False}}, []) == [
        Config(None, None), Config("tome", None, {"r": 0}), Config("mctf", 0.5, {"fast": False})]
    # no keeps asked for (eval-vlm's --tokens): no note
    notes = []
    assert sweep(["tome"], [], {"tome": {"r": 2}}, notes) == [Config(None, None), Config("tome", None, {"r": 2})]
    assert notes == []


def test_labels_name_the_budget_a_configuration_uses():
    assert Config("tome", None, {"r": 2}).label == "tome r=2"
    assert Config("tome", 0.5, {"r": None}).label == "tome keep=0.5 r=None"
    assert Config(None, None).label == "baseline"
    assert budget_label(dict(keep=0.25, options={"seed": 1})) == "0.25"
    assert budget_label(dict(keep=None, options={"object_layer": 2, "tokens": 64})) == "tokens=64"
    assert budget_label(dict(keep=None, options={"r": [3, 2], "fast": True})) == "r=[3, 2] fast=True"


def test_eval_evaluates_a_method_with_r_once_and_leaves_its_keep_empty(tmp_path, capsys):
    data = make_folder(tmp_path / "val", per_class=2, corrupt=False)
    out = tmp_path / "run.jsonl"
    rows = evaluate(["--no-pretrained", "--batch-size", "4", "--data", str(data), "--output", str(out), "--plot",
                     "--method", "tome", "random", "-o", "r=3", "--keep", "0.5", "0.25"])
    printed = capsys.readouterr().out
    assert [(r["method"], r["keep"], r["options"]) for r in rows] == [
        (None, None, {}), ("tome", None, {"r": 3}), ("random", None, {"r": 3})]
    assert "note: tome: r=3 sets its token counts, not --keep: evaluated once" in printed
    assert "tome r=3: " in printed  # its progress line names no keep
    table_row = [line for line in printed.splitlines() if line.startswith("tome ")][-1]
    assert table_row.split()[:2] == ["tome", "r=3"]  # nor does the table's keep column
    with open(out.with_suffix(".csv")) as f:
        assert [(r["method"], r["keep"]) for r in csv.DictReader(f)] == [("baseline", ""), ("tome", ""),
                                                                         ("random", "")]
    assert out.with_suffix(".png").stat().st_size > 5000
    # the row is the model patched with r=3 alone: the schedule a keep would give is another (fewer removed)
    model = tokenprune.eval.evaluate.load_model("vit_testbed_fmnist", False, None, 0)
    tokenprune.apply(model, "tome", r=3)
    assert rows[1]["gflops"] == pytest.approx(tokenprune.count_flops(model).gflops_per_sample)
    tokenprune.apply(model, "tome", keep=0.5)
    assert rows[1]["gflops"] != pytest.approx(tokenprune.count_flops(model).gflops_per_sample)


# ---------------------------------------------------------------- eval-vlm --tokens on LLaVA-NeXT

PINPOINTS = [[32, 64], [64, 32], [64, 64]]


@pytest.fixture(scope="module")
def tiny_next(tmp_path_factory):
    """A random-init LLaVA-NeXT (CLIP tower 32 px / patch 8, any resolution up to 2 x 2 crops) and its processor,
    saved, with six questions on 40 x 40 images (a 64 x 64 grid: five crops each)."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = word_tokenizer(WORDS)
    vision, text = tiny_towers(tokenizer, max_position_embeddings=2048)  # five crops and their newlines
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, vision_feature_layer=-2,
                             image_grid_pinpoints=PINPOINTS)
    folder = tmp_path_factory.mktemp("tiny-llava-next")
    LlavaNextForConditionalGeneration(config).eval().save_pretrained(folder / "model")
    images = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                     image_grid_pinpoints=PINPOINTS, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, chat_template=CHAT_TEMPLATE,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       ).save_pretrained(folder / "model")
    save_questions(folder / "data", {"image": [{"bytes": png_bytes(i)} for i in range(len(QUESTIONS))],
                                     "question": QUESTIONS, "answer": ["shirt", "yes", "red", "no", "coat", "bag"]})
    return folder


def visual_tokens_with(folder, **apply_kwargs) -> float:
    """Visual tokens per image the language model receives, each question's image alone, through transformers
    directly with ``tokenprune.apply(model, "hiprune", **apply_kwargs)``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder / "model")
    model = tokenprune.apply(AutoModelForImageTextToText.from_pretrained(folder / "model").eval(), "hiprune",
                             object_layer=2, **apply_kwargs)
    counts = []
    for i in range(len(QUESTIONS)):
        inputs = processor(text=["USER: <image>\nwhat ASSISTANT:"], return_tensors="pt",
                           images=[Image.open(io.BytesIO(png_bytes(i))).convert("RGB")])
        with torch.no_grad():
            model(**inputs)
        counts += tokenprune.last_forward(model).visual_tokens
    return sum(counts) / len(counts)


def test_eval_vlm_tokens_on_llava_next_is_each_selectors_tokens_option(tiny_next, tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    code = cli(["eval-vlm", "--model", str(tiny_next / "model"), "--data", str(tiny_next / "data"),
                "--method", "hiprune", "random-select", "-o", "object_layer=2", "--tokens", "40", "12",
                "--max-new-tokens", "2", "--output", str(out), "--plot"])
    printed = capsys.readouterr().out
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["keep"], r["options"]) for r in rows] == [
        (None, None, {}), ("hiprune", None, {"object_layer": 2, "tokens": 40}),
        ("hiprune", None, {"object_layer": 2, "tokens": 12}), ("random-select", None, {"tokens": 40}),
        ("random-select", None, {"tokens": 12})]
    # each budget is the one apply(tokens=) gives: the image's, over its five crops (and its rows' newlines)
    assert rows[1]["visual_tokens_per_image"] == pytest.approx(visual_tokens_with(tiny_next, tokens=40))
    assert rows[2]["visual_tokens_per_image"] == pytest.approx(visual_tokens_with(tiny_next, tokens=12))
    assert rows[1]["visual_tokens_per_image"] != pytest.approx(visual_tokens_with(tiny_next, keep=40 / 88))
    assert rows[0]["visual_tokens_per_image"] > rows[1]["visual_tokens_per_image"] > rows[2]["visual_tokens_per_image"]
    # the table tells the budgets apart
    assert "object_layer=2,tokens=40" in printed and "object_layer=2,tokens=12" in printed
    assert out.with_suffix(".png").stat().st_size > 5000


@pytest.mark.parametrize("extra, message", [
    (["--method", "hiprune", "-o", "object_layer=2", "-o", "tokens=8", "--tokens", "4"],
     "--tokens and hiprune's option tokens=8 both set its visual tokens per image: pass one of them"),
    (["--method", "hiprune", "tome", "random", "--tokens", "4"],  # the first method without a tokens= budget
     "--tokens: LlavaNextForConditionalGeneration gives each image as many visual tokens as its size calls for, and "
     "tome takes no budget in tokens; pass --keep"),
])
def test_eval_vlm_tokens_refusals_are_one_line(tiny_next, tmp_path, capsys, extra, message):
    code = cli(["eval-vlm", "--model", str(tiny_next / "model"), "--data", str(tiny_next / "data"),
                "--output", str(tmp_path / "run.jsonl"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run.jsonl").exists()
