"""Review of the user-level flows of ``tokenprune eval-vlm``, the lmms-eval plugin and the pipeline wrapper: each
test failed before its fix."""
from __future__ import annotations

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
