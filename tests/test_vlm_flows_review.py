"""Review of the user-level flows of ``tokenprune eval-vlm``, the lmms-eval plugin and the pipeline wrapper: each
test failed before its fix."""
from __future__ import annotations

import pytest
from test_eval_vlm import QUESTIONS, png_bytes, tiny_vlm  # noqa: F401  (a fixture)
from tokenprune.eval.vlm import exact_match, normalize_answer, vqa_accuracy

from tokenprune.cli import main as cli_main


def test_none_answers_a_count_as_the_vqa_evaluation_reads_it():
    """The VQA evaluation (and lmms-eval's) maps "none" to "0" with the number words: a model answering "none" to
    "how many ...?" was scored wrong against the references "0"."""
    assert normalize_answer("None") == "0"
    assert vqa_accuracy("none", ["0"] * 10) == 1.0
    assert exact_match("None.", ["0"]) == 1.0


def test_a_choices_column_of_text_is_refused_not_read_as_letters(tiny_vlm, tmp_path, capsys):  # noqa: F811
    """A choices column holding one text per question was read with list(...): its characters were the options
    ("s", "h", "i", ...), and the choice metric scored against them; now a one-line error before the model loads."""
    from datasets import Dataset, Features, Value
    from datasets import Image as HFImage

    rows = dict(image=[{"bytes": png_bytes(i)} for i in range(2)], question=QUESTIONS[:2],
                choices=["shirt|bag", "coat|shoe"], answer=["A", "B"])
    features = Features(image=HFImage(), question=Value("string"), choices=Value("string"), answer=Value("string"))
    Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "q"))
    capsys.readouterr()
    code = cli_main(["eval-vlm", "--model", str(tiny_vlm), "--data", str(tmp_path / "q"), "--keep", "0.5",
                     "-o", "object_layer=1", "--max-new-tokens", "1", "--output", str(tmp_path / "r.jsonl"),
                     "--device", "cpu", "--timing-repeats", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--choices-column choices: a list of options per question" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.jsonl").exists()


def test_options_are_text_trailing_missing_ones_dropped_a_gap_refused():
    """Options of numbers or with missing (None) entries failed inside the scorer with a traceback."""
    from tokenprune.eval.vlm import chosen_option, option_texts, reference_option

    assert option_texts([3, 4.5, "five"], 0) == ["3", "4.5", "five"]
    assert option_texts(["red", "blue", None, None], 0) == ["red", "blue"]
    assert option_texts([None], 0) == []
    numbers = option_texts([3, 4.5], 0)
    assert chosen_option("4.5", numbers) == 1 and reference_option("B", numbers) == 1
    with pytest.raises(ValueError, match="question 7: option B is missing"):
        option_texts(["red", None, "blue"], 7)


def test_a_questions_options_are_read_as_text_without_missing_ones(tmp_path):
    """A row's options of numbers reached the scorer as numbers (a traceback when an answer was compared with
    them), and a missing last option (None) was shown to the model as "C. None"."""
    from datasets import Dataset, Features, Sequence, Value
    from datasets import Image as HFImage
    from tokenprune.eval.vlm import Questions

    rows = dict(image=[{"bytes": png_bytes(i)} for i in range(2)], question=QUESTIONS[:2],
                choices=[[1.0, 2.0, 3.0], [4.0, 5.0, None]], answer=["A", "B"])
    features = Features(image=HFImage(), question=Value("string"), choices=Sequence(Value("float64")),
                        answer=Value("string"))
    questions = Questions(Dataset.from_dict(rows, features=features), None, "question", "answer", "choices")
    assert questions[0]["choices"] == ["1.0", "2.0", "3.0"] and questions[1]["choices"] == ["4.0", "5.0"]
