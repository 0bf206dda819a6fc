"""``tokenprune eval-vlm`` end to end on a tiny random LLaVA-1.5 saved with its processor, and a question set
the tests build: the sweep and its baseline, each metric against values computed here by hand, resume after
an interruption, the files it writes, a corrupt image skipped and counted, and bad input as one line."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenprune.eval import vlm as eval_vlm
from tokenprune.eval.vlm import (
    chosen_option,
    exact_match,
    normalize_answer,
    reference_option,
    score,
    vqa_accuracy,
)

from tokenprune.cli import main as cli_main
from tokenprune.vlm_testbed import IMAGE, PAD, llava_processor, word_tokenizer

WORDS = ("what is in the image ? answer question using a single word or phrase . with option's letter from "
         "given choices directly shirt bag coat shoe red blue yes no one two three user assistant :").split()
QUESTIONS = ["what is in the image ?", "is it red ?", "what is the shoe ?", "is it blue ?", "what coat ?",
             "is it a bag ?"]


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def tiny_towers(tokenizer, max_position_embeddings: int = 512):
    """The tiny LLaVAs' CLIP tower (32 px / patch 8: 16 visual tokens per crop) and Llama language model configs,
    with the seed their weights are drawn from set."""
    from transformers import CLIPVisionConfig, LlamaConfig

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=96, max_position_embeddings=max_position_embeddings,
                       pad_token_id=PAD, bos_token_id=2, eos_token_id=3)
    return vision, text


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A random-init LLaVA-1.5 (CLIP tower 32 px / patch 8: 16 visual tokens per image) and its processor, saved."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tokenizer = word_tokenizer(WORDS)
    vision, text = tiny_towers(tokenizer)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, vision_feature_layer=-2)
    folder = tmp_path_factory.mktemp("tiny-llava")
    LlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    llava_processor(tokenizer, image_size=32, patch_size=8).save_pretrained(folder)
    return folder


def own_answers(folder, questions: list[str], images: list, post_prompt: str, keep=None,
                template: str = "USER: {images}\n{question} ASSISTANT:", positions=None,
                max_new_tokens: int = 4) -> list[str]:
    """The model's greedy answers, one question at a time (no padding), through transformers directly; each
    question's images (one, or a list), each its own ``<image>`` line in ``template``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import tokenprune

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    if keep is not None:
        tokenprune.apply(model, "hiprune", keep=keep, object_layer=1, **({"positions": positions} if positions else {}))
    answers = []
    for question, image in zip(questions, images):
        image = image if isinstance(image, list) else [image]
        text = template.replace("{images}", "\n".join(["<image>"] * len(image))).replace(
            "{question}", question + post_prompt)
        inputs = processor(text=[text], images=[Image.open(io.BytesIO(b)).convert("RGB") for b in image],
                           return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        answers.append(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def save_questions(path, rows: dict):
    from datasets import Dataset, Features, Sequence, Value
    from datasets import Image as HFImage

    features = {"image": HFImage(), "question": Value("string")}
    for key, value in rows.items():
        if key not in features:
            features[key] = Sequence(Value("string")) if isinstance(value[0], list) else Value("string")
    Dataset.from_dict(rows, features=Features(features)).save_to_disk(str(path))
    return path


# ---------------------------------------------------------------- metrics by hand


def test_normalisation_follows_the_vqa_evaluation():
    assert normalize_answer("  The Two Dogs. ") == "2 dogs"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("yes!") == "yes"
    assert normalize_answer("t-shirt") == "t shirt"
    assert normalize_answer("An apple") == "apple"


def test_exact_match_and_vqa_accuracy():
    assert exact_match("Yes.", ["yes"]) == 1.0
    assert exact_match("no", ["yes", "maybe"]) == 0.0
    assert exact_match("maybe", ["yes", "maybe"]) == 1.0
    refs = ["two", "2", "2", "3", "three"]
    assert vqa_accuracy("2", refs) == 1.0  # three matches
    assert vqa_accuracy("three", refs) == pytest.approx(2 / 3)
    assert vqa_accuracy("4", refs) == 0.0
    assert vqa_accuracy("3", ["3"]) == pytest.approx(1 / 3)


def test_multiple_choice_reads_letters_and_texts():
    choices = ["shirt", "bag", "coat"]
    assert chosen_option("B", choices) == 1
    assert chosen_option("(c) coat", choices) == 2
    assert chosen_option("C.", choices) == 2
    assert chosen_option("bag", choices) == 1
    assert chosen_option("D", choices) is None  # no fourth option
    assert chosen_option("Coats", choices) is None
    assert reference_option("b", choices) == 1
    assert reference_option(2, choices) == 2
    assert reference_option("Shirt", choices) == 0
    with pytest.raises(ValueError, match="neither"):
        reference_option("hat", choices)


def test_an_options_text_comes_before_a_letter_and_a_letter_needs_its_mark():
    """"A blue car" is the option "A blue car", not option A through its article; a letter counts alone or marked by
    '.', ')' or ':', and a letter followed by a space is no letter."""
    cars = ["A red car", "A blue car"]
    for said in cars + [c.lower() + "." for c in cars]:
        assert chosen_option(said, cars) == [normalize_answer(c) for c in cars].index(normalize_answer(said))
    assert score("choice", "A blue car", "A blue car", cars) == 1.0
    assert score("choice", "A blue car", "B", cars) == 1.0 and score("choice", "A blue car", "A", cars) == 0.0
    letters = eval_vlm.LETTERS
    for said in ("A", "b", "A.", "(B)", "B) blue", "a: red", "(A"):
        assert chosen_option(said, cars) == letters.index(said.strip("(").upper()[0]), said
    assert chosen_option("B bag", ["shirt", "bag"]) is None and chosen_option("", ["shirt", "bag"]) is None


def test_answer_columns_in_every_accepted_form():
    assert eval_vlm.answer_list("a") == ["a"]
    assert eval_vlm.answer_list(["a", "b"]) == ["a", "b"]
    assert eval_vlm.answer_list([{"answer": "a", "answer_confidence": "yes"}, {"answer": "b"}]) == ["a", "b"]
    assert eval_vlm.answer_list(3) == ["3"]
    with pytest.raises(ValueError, match="reference answer"):
        eval_vlm.answer_list([1, 2])


# ---------------------------------------------------------------- end to end


def test_sweep_baseline_metric_files_and_a_corrupt_image(tiny_vlm, tmp_path, capsys):
    images = [png_bytes(i) for i in range(len(QUESTIONS))]
    post = eval_vlm.SHORT_ANSWER_PROMPT
    base = own_answers(tiny_vlm, QUESTIONS, images, post)
    pruned = own_answers(tiny_vlm, QUESTIONS, images, post, keep=0.5)
    # The references: the model's own answer for the first four questions, another word for the last two;
    # a seventh question whose image is corrupt.
    refs = base[:4] + ["zzz", "zzz"] + ["yes"]
    data = save_questions(tmp_path / "questions", dict(image=[{"bytes": b} for b in images] + [{"bytes": b"broken"}],
                                                       question=QUESTIONS + ["is it red ?"], answer=refs))
    out = tmp_path / "res.jsonl"
    argv = ["eval-vlm", "--model", str(tiny_vlm), "--data", str(data), "--split", "train", "--method", "hiprune",
            "--keep", "0.5", "-o", "object_layer=1", "--batch-size", "4", "--max-new-tokens", "4",
            "--output", str(out), "--plot", "--device", "cpu", "--timing-repeats", "1"]
    assert cli_main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["keep"]) for r in rows] == [(None, None), ("hiprune", 0.5)]
    assert rows[0]["metric"] == "exact"
    assert rows[0]["accuracy"] == pytest.approx(100 * 4 / 6)
    expected = sum(exact_match(p, [r]) for p, r in zip(pruned, refs[:6]))
    assert rows[1]["accuracy"] == pytest.approx(100 * expected / 6)
    assert [r["visual_tokens_per_image"] for r in rows] == [16, 8]
    for r in rows:
        assert r["questions"] == 6 and r["skipped"] == 1
        assert r["skip_reasons"] == {"not an image PIL recognises": 1}
        assert r["prefill_gflops"] > 0 and r["prefill_ms"] > 0 and 0.0 <= r["foreign_load"] <= 1.0
    assert rows[1]["prefill_gflops"] < rows[0]["prefill_gflops"]
    csv_rows = out.with_suffix(".csv").read_text().splitlines()
    assert csv_rows[0].startswith("method,keep,options,metric,accuracy,retention")
    assert csv_rows[1].startswith("baseline,,{},exact,")
    assert float(csv_rows[2].split(",")[5]) == pytest.approx(rows[1]["accuracy"] / rows[0]["accuracy"])
    assert out.with_suffix(".png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "skipped 1 unreadable image(s): 1 not an image PIL recognises" in printed


def test_vqa_and_choice_metrics_end_to_end(tiny_vlm, tmp_path):
    images = [png_bytes(10 + i) for i in range(4)]
    questions = QUESTIONS[:4]
    base = own_answers(tiny_vlm, questions, images, eval_vlm.SHORT_ANSWER_PROMPT)
    # VQA: each question's references hold the model's own answer 3, 2, 1 and 0 times
    answers = [[a] * n + ["zzz"] * (5 - n) for a, n in zip(base, (3, 2, 1, 0))]
    data = save_questions(tmp_path / "vqa", dict(image=[{"bytes": b} for b in images], question=questions,
                                                 answers=answers))
    out = tmp_path / "vqa.jsonl"
    assert cli_main(["eval-vlm", "--model", str(tiny_vlm), "--data", str(data), "--split", "train",
                     "--answer-column", "answers", "--method", "hiprune", "--tokens", "4", "16", "-o", "object_layer=1",
                     "--max-new-tokens", "4", "--output", str(out), "--device", "cpu", "--timing-repeats", "1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["metric"] == "vqa"
    assert rows[0]["accuracy"] == pytest.approx(100 * (1 + 2 / 3 + 1 / 3 + 0) / 4)
    assert rows[1]["keep"] == 0.25 and rows[1]["visual_tokens_per_image"] == 4
    # every one of an image's 16 tokens: the stock model's answers
    assert rows[2]["keep"] == 1.0 and rows[2]["visual_tokens_per_image"] == 16
    assert rows[2]["accuracy"] == rows[0]["accuracy"]

    # Multiple choice: the options are the model's own answer and another word; the reference names the
    # model's answer by letter for two questions and the other option for the rest.
    choice_prompt = eval_vlm.CHOICE_PROMPT
    prompts = [q + "\nA. shirt\nB. bag" for q in questions]
    said = own_answers(tiny_vlm, prompts, images, choice_prompt)
    picked = [chosen_option(s, ["shirt", "bag"]) for s in said]
    refs = ["A" if p == 0 else "B" for p in picked[:2]] + ["B" if p == 0 else "A" for p in picked[2:]]
    expected = sum(1 for p, r in zip(picked, refs) if p is not None and "AB"[p] == r)
    data = save_questions(tmp_path / "mc", dict(image=[{"bytes": b} for b in images], question=questions,
                                                choices=[["shirt", "bag"]] * 4, answer=refs))
    out = tmp_path / "mc.jsonl"
    assert cli_main(["eval-vlm", "--model", str(tiny_vlm), "--data", str(data), "--split", "train",
                     "--method", "hiprune", "--keep", "1.0", "-o", "object_layer=1", "--max-new-tokens", "4",
                     "--output", str(out), "--device", "cpu", "--timing-repeats", "1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["metric"] == "choice"
    assert rows[0]["accuracy"] == pytest.approx(100 * expected / 4)
    assert rows[1]["accuracy"] == rows[0]["accuracy"]  # keep=1.0 answers exactly as the stock model


def test_resume_after_an_interruption(tiny_vlm, tmp_path, monkeypatch):
    images = [png_bytes(20 + i) for i in range(3)]
    data = save_questions(tmp_path / "q", dict(image=[{"bytes": b} for b in images], question=QUESTIONS[:3],
                                               answer=["yes", "no", "bag"]))
    out = tmp_path / "res.jsonl"
    argv = ["eval-vlm", "--model", str(tiny_vlm), "--data", str(data), "--split", "train", "--method", "hiprune",
            "tome", "--keep", "0.5", "-o", "object_layer=1", "--max-new-tokens", "3", "--output", str(out),
            "--device", "cpu", "--timing-repeats", "1"]
    assert cli_main([*argv, "--output", str(tmp_path / "full.jsonl")]) == 0  # uninterrupted
    full = [json.loads(line) for line in (tmp_path / "full.jsonl").read_text().splitlines()]

    real, calls = eval_vlm.evaluate_vlm_config, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(eval_vlm, "evaluate_vlm_config", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli_main(argv)
    assert len(out.read_text().splitlines()) == 1  # the baseline, finished, is on disk
    with open(out, "a") as f:
        f.write('{"key": "torn')  # and a line an interrupted write tore
    assert cli_main(argv) == 2  # the file exists: --resume or --overwrite
    calls.clear()
    monkeypatch.setattr(eval_vlm, "evaluate_vlm_config", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert cli_main(argv + ["--resume"]) == 0
    assert len(calls) == 2  # hiprune and tome; the baseline was not evaluated again
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["keep"]) for r in rows] == [(None, None), ("hiprune", 0.5), ("tome", 0.5)]
    assert rows[0]["accuracy"] == full[0]["accuracy"]


@pytest.mark.parametrize("extra, message", [
    (["--question-column", "prompt"], "--question-column prompt: the data's columns are"),
    (["--method", "nope"], "nope"),
    (["--keep", "1.5"], "keep must be in (0, 1]"),
    (["--tokens", "4", "17", "18", "-o", "object_layer=1"], "--tokens 17: each image has 16 visual tokens"),
    (["--metric", "choice"], "--metric choice needs the options"),
    (["--method", "tome", "-o", "object_layer=1"], "-o object_layer: no method of the sweep (tome) takes it"),
    (["-o", "object_layer=99"], "object_layer=99 is outside the 3-layer vision tower"),
    (["--prompt-template", "USER: {images}"], "must contain {question}"),
])
def test_bad_input_is_one_line(tiny_vlm, tmp_path, capsys, extra, message):
    data = save_questions(tmp_path / "q", dict(image=[{"bytes": png_bytes(0)}], question=["is it red ?"],
                                               answer=["yes"]))
    capsys.readouterr()  # the dataset's saving progress
    code = cli_main(["eval-vlm", "--model", str(tiny_vlm), "--data", str(data), "--split", "train",
                     "--output", str(tmp_path / "r.jsonl"), "--device", "cpu", *extra])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]  # beside transformers' loading bars
    assert code == 2 and "Traceback" not in err and len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "r.jsonl").exists()


def test_missing_model_and_data_are_one_line(tmp_path, capsys):
    data = save_questions(tmp_path / "q", dict(image=[{"bytes": png_bytes(0)}], question=["is it red ?"],
                                               answer=["yes"]))
    capsys.readouterr()
    assert cli_main(["eval-vlm", "--model", str(tmp_path / "none"), "--data", str(data), "--split", "train"]) == 2
    assert "--model" in capsys.readouterr().err
    assert cli_main(["eval-vlm", "--model", str(data), "--data", str(data), "--split", "train"]) == 2
    assert "does not load as a vision-language model" in capsys.readouterr().err
    assert cli_main(["eval-vlm", "--model", str(tmp_path), "--data", "./no/such/folder"]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["eval-vlm", "--model", str(tmp_path), "--data", str(tmp_path / "empty")]) == 2
    assert "does not load as a dataset" in capsys.readouterr().err
    from datasets import DatasetDict, load_from_disk

    DatasetDict(test=load_from_disk(str(data))).save_to_disk(str(tmp_path / "dict"))
    capsys.readouterr()
    assert cli_main(["eval-vlm", "--model", str(tmp_path), "--data", str(tmp_path / "dict"), "--split", "val"]) == 2
    assert "--split val: " in capsys.readouterr().err


def test_two_processes_gather_exactly(tiny_vlm, tmp_path):
    """Two CPU processes (accelerate under torchrun): five questions (one process gets a padded shard) give the
    one-process accuracy and counts exactly."""
    import os
    import subprocess
    import sys

    images = [png_bytes(30 + i) for i in range(5)]
    base = own_answers(tiny_vlm, QUESTIONS[:5], images, eval_vlm.SHORT_ANSWER_PROMPT)
    refs = base[:3] + ["zzz", "zzz"]  # 3 of 5 right, however the questions are split
    data = save_questions(tmp_path / "q", dict(image=[{"bytes": b} for b in images], question=QUESTIONS[:5],
                                               answer=refs))
    out = tmp_path / "res.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # torchrun: accelerate's own `launch --cpu --num_processes 2` (accelerate 1.16) starts one process only
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "tokenprune.eval.vlm", "--model", str(tiny_vlm), "--data", str(data),
                             "--method", "hiprune", "--keep", "0.5", "-o", "object_layer=1", "--batch-size", "2",
                             "--max-new-tokens", "4", "--output", str(out), "--timing-repeats", "1"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and [r["questions"] for r in rows] == [5, 5]
    assert rows[0]["accuracy"] == pytest.approx(60.0)
    assert rows[1]["visual_tokens_per_image"] == 8
    assert [r["foreign_load"] for r in rows] == [None, None]  # two processes count each other: no figure


def test_template_post_prompt_two_image_columns_limit_positions_and_overwrite(tiny_vlm, tmp_path):
    first, second = [png_bytes(40 + i) for i in range(4)], [png_bytes(50 + i) for i in range(4)]
    template = "{images} {question} :"
    pairs = [[a, b] for a, b in zip(first, second)]
    base = own_answers(tiny_vlm, QUESTIONS[:3], pairs[:3], "", template=template)
    pruned = own_answers(tiny_vlm, QUESTIONS[:3], pairs[:3], "", keep=0.5, template=template, positions="original")
    refs = [base[0], base[1], "zzz", "never read"]  # the fourth is past --limit
    from datasets import Dataset, Features, Value
    from datasets import Image as HFImage

    Dataset.from_dict(dict(front=[{"bytes": b} for b in first], back=[{"bytes": b} for b in second],
                           other=[{"bytes": png_bytes(0)}] * 4, question=QUESTIONS[:4], answer=refs),
                      features=Features(front=HFImage(), back=HFImage(), other=HFImage(), question=Value("string"),
                                        answer=Value("string"))).save_to_disk(str(tmp_path / "q"))
    out = tmp_path / "res.jsonl"
    out.write_text("an old file\n")
    argv = ["eval-vlm", "--model", str(tiny_vlm), "--data", str(tmp_path / "q"), "--image-column", "front", "back",
            "--prompt-template", template, "--post-prompt", "", "--limit", "3", "--positions", "original",
            "--method", "hiprune", "--keep", "0.5", "-o", "object_layer=1", "--max-new-tokens", "4",
            "--output", str(out), "--overwrite", "--device", "cpu", "--timing-repeats", "1", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert cli_main(argv) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["questions"] == 3
    assert rows[0]["accuracy"] == pytest.approx(100 * 2 / 3)
    assert rows[1]["accuracy"] == pytest.approx(100 * sum(exact_match(p, [r]) for p, r in zip(pruned, refs)) / 3)
    assert rows[1]["visual_tokens_per_image"] == 8


def test_max_new_tokens_batch_size_dtype_and_a_named_choices_column(tiny_vlm, tmp_path):
    images = [png_bytes(70 + i) for i in range(3)]
    firsts = own_answers(tiny_vlm, QUESTIONS[:3], images, eval_vlm.SHORT_ANSWER_PROMPT, max_new_tokens=1)
    longer = own_answers(tiny_vlm, QUESTIONS[:3], images, eval_vlm.SHORT_ANSWER_PROMPT, max_new_tokens=4)
    data = save_questions(tmp_path / "q", dict(image=[{"bytes": b} for b in images], question=QUESTIONS[:3],
                                               answer=firsts))

    def run(*extra):
        out = tmp_path / f"r{len(list(tmp_path.glob('r*.jsonl')))}.jsonl"
        assert cli_main(["eval-vlm", "--model", str(tiny_vlm), "--data", str(data), "--method", "hiprune",
                         "--keep", "0.5", "-o", "object_layer=1", "--output", str(out), "--device", "cpu",
                         "--timing-repeats", "1", *extra]) == 0
        return [json.loads(line) for line in out.read_text().splitlines()]

    # one new token: the model's first token, whatever the batch; four: its longer answers
    one = run("--max-new-tokens", "1", "--batch-size", "1")
    assert one[0]["accuracy"] == 100.0
    four = run("--max-new-tokens", "4")
    assert four[0]["accuracy"] == pytest.approx(100 * sum(exact_match(a, [f]) for a, f in zip(longer, firsts)) / 3)
    assert four[0]["accuracy"] < 100.0
    assert run("--max-new-tokens", "1", "--batch-size", "3")[0]["accuracy"] == 100.0
    half = run("--max-new-tokens", "1", "--dtype", "bf16")
    assert half[0]["key"] != one[0]["key"] and '"dtype": "bf16"' in half[0]["key"]

    data = save_questions(tmp_path / "mc", dict(image=[{"bytes": b} for b in images], question=QUESTIONS[:3],
                                                options=[["yes", "no"]] * 3, answer=["A", "B", "A"]))
    out = tmp_path / "mc.jsonl"
    assert cli_main(["eval-vlm", "--model", str(tiny_vlm), "--data", str(data), "--choices-column", "options",
                     "--method", "hiprune", "--keep", "0.5", "-o", "object_layer=1", "--max-new-tokens", "2",
                     "--output", str(out), "--device", "cpu", "--timing-repeats", "1"]) == 0
    assert json.loads(out.read_text().splitlines()[0])["metric"] == "choice"


def test_default_keeps_and_the_prefill_cost(tiny_vlm, tmp_path, monkeypatch, capsys):
    """Without --keep the sweep is HiPrune's 192 / 128 / 64 of 576 (1/3, 2/9, 1/9); the prefill is counted with
    the logits of the last position only, per question, and timed in milliseconds, with the share of the CPUs
    other processes used meanwhile (replaced here: busy while the second configuration is timed)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import tokenprune

    data = save_questions(tmp_path / "q", dict(image=[{"bytes": png_bytes(80 + i)} for i in range(2)],
                                               question=QUESTIONS[:2], answer=["yes", "no"]))
    monkeypatch.setattr("tokenprune.timing.timed", lambda call, device=None: (call(), 0.25))
    readings = iter([0.0, 0.2, 0.01, 0.0])
    monkeypatch.setattr("tokenprune.timing.ForeignLoad.__exit__", lambda self, *exc: setattr(self, "value",
                                                                                             next(readings)))
    out = tmp_path / "r.jsonl"
    assert cli_main(["eval-vlm", "--model", str(tiny_vlm), "--data", str(data), "-o", "object_layer=1",
                     "--max-new-tokens", "1", "--output", str(out), "--device", "cpu", "--timing-repeats", "1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["keep"] for r in rows] == [None, 1 / 3, 2 / 9, 1 / 9]
    assert [r["visual_tokens_per_image"] for r in rows] == [16, 5, 4, 2]
    assert all(r["prefill_ms"] == 250.0 for r in rows)
    assert [r["foreign_load"] for r in rows] == [0.0, 0.2, 0.01, 0.0]
    assert ("note: other processes used up to 20% of the CPUs while this ran (hiprune): the prefill ms column is "
            "unreliable; `tokenprune bench-vlm` times configurations interleaved") in capsys.readouterr().out
    processor = AutoProcessor.from_pretrained(tiny_vlm)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm).eval()
    from PIL import Image

    texts = [f"USER: <image>\n{q}{eval_vlm.SHORT_ANSWER_PROMPT} ASSISTANT:" for q in QUESTIONS[:2]]
    processor.tokenizer.padding_side = "left"
    inputs = dict(processor(text=texts, images=[Image.open(io.BytesIO(png_bytes(80 + i))).convert("RGB")
                                                for i in range(2)], return_tensors="pt", padding=True))
    last_only = tokenprune.count_flops(model, inputs={**inputs, "logits_to_keep": 1}).flops / 2 / 1e9
    every = tokenprune.count_flops(model, inputs=inputs).flops / 2 / 1e9
    assert rows[0]["prefill_gflops"] == pytest.approx(last_only) and last_only < every


def test_a_reference_may_be_the_first_option_by_index():
    assert reference_option(0, ["shirt", "bag"]) == 0
    assert reference_option(1, ["shirt", "bag"]) == 1
    with pytest.raises(ValueError):
        reference_option(2, ["shirt", "bag"])
    with pytest.raises(ValueError):
        reference_option(True, ["shirt", "bag"])


def choice_questions(path):
    """Two multiple-choice questions with a second question, answer and choices column each."""
    return save_questions(path, dict(image=[{"bytes": png_bytes(60 + i)} for i in range(2)], question=QUESTIONS[:2],
                                     prompt=QUESTIONS[2:4], choices=[["shirt", "bag"]] * 2,
                                     options=[["coat", "shoe"]] * 2, answer=["A", "B"], label=["B", "A"]))


@pytest.mark.parametrize("other", [["--answer-column", "label"], ["--question-column", "prompt"],
                                   ["--choices-column", "options"], ["--batch-size", "1"]])
def test_resume_with_other_columns_or_batch_size_is_another_run(tiny_vlm, tmp_path, monkeypatch, other):
    """Another answer, question or choices column is another question set, and another batch size other prefill
    times: a resume under them evaluates every configuration afresh, and resumes all of its own run."""
    data = choice_questions(tmp_path / "q")
    out = tmp_path / "res.jsonl"
    argv = ["eval-vlm", "--model", str(tiny_vlm), "--data", str(data), "--split", "train", "--method", "hiprune",
            "--keep", "0.5", "-o", "object_layer=1", "--max-new-tokens", "2", "--batch-size", "2", "--output", str(out),
            "--device", "cpu", "--timing-repeats", "1"]
    assert cli_main(argv) == 0
    real, calls = eval_vlm.evaluate_vlm_config, []
    monkeypatch.setattr(eval_vlm, "evaluate_vlm_config", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert cli_main(argv + other + ["--resume"]) == 0
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(calls) == len(first) // 2  # the baseline and hiprune again: nothing of the first run reused
    calls.clear()
    assert cli_main(argv + other + ["--resume"]) == 0
    assert calls == []


def test_a_repeated_method_or_token_count_is_evaluated_once(tiny_vlm, tmp_path, capsys):
    out = tmp_path / "res.jsonl"
    assert cli_main(["eval-vlm", "--model", str(tiny_vlm), "--data", str(choice_questions(tmp_path / "q")), "--split",
                     "train", "--method", "hiprune", "hiprune", "--tokens", "8", "4", "8", "-o", "object_layer=1",
                     "--max-new-tokens", "1", "--output", str(out), "--device", "cpu", "--timing-repeats", "1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["method"] is None and [(r["method"], r["visual_tokens_per_image"]) for r in rows[1:]] == [
        ("hiprune", 8), ("hiprune", 4)]  # --tokens' values, each once
    printed = capsys.readouterr().out
    assert "note: --method hiprune given more than once: evaluated once" in printed
    assert "note: --tokens 8 given more than once: evaluated once" in printed
