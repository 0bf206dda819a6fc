"""The lmms-eval plugin end to end: lmms-eval's own CLI finds ``tokenprune_llava`` through the entry point,
loads a tiny LLaVA saved with its processor, runs a tiny local task built here (no hub), and scores the
pruned model; the visual tokens it reports are the budget. Needs the ``vlm-eval`` extra (``make test``
installs it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_eval_vlm import QUESTIONS, WORDS, png_bytes, tiny_vlm  # noqa: F401  (a fixture)

pytest.importorskip("lmms_eval")

TASK_UTILS = '''
import io

from PIL import Image


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
'''


def tiny_task(folder, data_path) -> None:
    folder.mkdir()
    (folder / "utils.py").write_text(TASK_UTILS)
    (folder / "tiny_vqa.yaml").write_text(textwrap.dedent(f"""\
        task: tokenprune_tiny_vqa
        dataset_path: {data_path}
        dataset_kwargs:
          load_from_disk: true
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 3
          temperature: 0
          do_sample: false
        process_results: !function utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """))


@pytest.fixture(scope="module")
def tiny_qwen_folder(tmp_path_factory):
    """A random-init Qwen2.5-VL (patch 4, 2x2 merger: a 32x32 image gives 16 visual tokens) with its processor."""
    from tokenprune.vlm_testbed import random_qwen25vl

    model, processor = random_qwen25vl(WORDS)
    folder = tmp_path_factory.mktemp("tiny-qwen")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def run_lmms(tmp_path, model_folder, task_dir, model_args: str, model: str = "tokenprune_llava",
             ) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "lmms_eval", "--model", model, "--model_args",
                           f"pretrained={model_folder},device=cpu,{model_args}", "--tasks",
                           "tokenprune_tiny_vqa", "--include_path", str(task_dir), "--batch_size", "1",
                           "--output_path", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)


def local_task(tmp_path):
    from datasets import Dataset, DatasetDict, Features, Image, Value

    rows = dict(image=[{"bytes": png_bytes(60 + i)} for i in range(3)], question=QUESTIONS[:3],
                answer=["shirt", "yes", "no"])
    DatasetDict(test=Dataset.from_dict(rows, features=Features(image=Image(), question=Value("string"),
                                                                answer=Value("string")))
                ).save_to_disk(str(tmp_path / "data"))
    tiny_task(tmp_path / "task", tmp_path / "data")


def test_lmms_eval_runs_a_local_task_with_the_pruned_model(tiny_vlm, tmp_path):  # noqa: F811
    local_task(tmp_path)
    stats = tmp_path / "stats.json"
    result = run_lmms(tmp_path, tiny_vlm, tmp_path / "task",
                      f"dtype=float32,method=hiprune,keep=0.5,object_layer=1,stats_file={stats}")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    summary = json.loads(stats.read_text())
    assert summary["method"] == "hiprune" and summary["images"] == 3
    assert summary["placeholders_per_image"] == 16 and summary["visual_tokens_per_image"] == 8
    assert summary["generate_calls"] == 3 and summary["prefill_ms_median"] > 0
    assert "tokenprune: {" in result.stdout
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("*results.json")]
    assert results and "exact_match,none" in results[0]["results"]["tokenprune_tiny_vqa"]

    # the stock model through the same code: every placeholder reaches the language model
    result = run_lmms(tmp_path, tiny_vlm, tmp_path / "task", f"dtype=float32,method=none,stats_file={stats}")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert json.loads(stats.read_text())["visual_tokens_per_image"] == 16

    # a bad configuration fails before any answer (lmms-eval itself exits 0 and prints the error)
    for old in (tmp_path / "out").rglob("*results.json"):
        old.unlink()
    result = run_lmms(tmp_path, tiny_vlm, tmp_path / "task", "dtype=float32,method=hiprune,keep=0.5,object_layer=99")
    assert "object_layer=99 is outside the 3-layer vision tower" in result.stdout + result.stderr
    assert not list((tmp_path / "out").rglob("*results.json"))


def test_an_error_inside_generate_is_raised_not_scored(tiny_vlm, monkeypatch):  # noqa: F811
    """lmms-eval's llava_hf catches every exception of generate and records an empty answer; the plugin raises
    it at the end of the batch instead."""
    import torch
    from lmms_eval.models.simple.llava_hf import LlavaHf
    from tokenprune.eval.lmms_models import TokenpruneLlava

    def like_lmms_eval(self, requests):  # what llava_hf does around generate
        try:
            self.model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2)  # no image
        except Exception:
            return [""]
        return ["unexpected"]

    monkeypatch.setattr(LlavaHf, "generate_until", like_lmms_eval)
    model = TokenpruneLlava(pretrained=str(tiny_vlm), device="cpu", dtype="float32", method="hiprune", keep=0.5,
                            object_layer=1)
    with pytest.raises(RuntimeError, match="a pruned VLM needs at least one image"):
        model.generate_until([])
    with pytest.raises(TypeError, match="unknown option"):
        TokenpruneLlava(pretrained=str(tiny_vlm), device="cpu", method="tome", keep=0.5, object_layer=1)


def test_lmms_eval_qwen2_5_vl(tiny_qwen_folder, tmp_path):
    """lmms-eval's own qwen2_5_vl class (bf16, its vision-info pipeline) with HiPrune: 8 of 16 tokens per image."""
    local_task(tmp_path)
    stats = tmp_path / "stats.json"
    result = run_lmms(tmp_path, tiny_qwen_folder, tmp_path / "task",
                      f"method=hiprune,keep=0.5,object_layer=2,min_pixels=1024,max_pixels=1024,stats_file={stats}",
                      model="tokenprune_qwen2_5_vl")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    summary = json.loads(stats.read_text())
    assert summary["images"] == 3 and summary["placeholders_per_image"] == 16
    assert summary["visual_tokens_per_image"] == 8
    assert list((tmp_path / "out").rglob("*results.json"))


def test_tokens_must_be_whole_and_each_generate_until_reports_its_own_requests(tiny_vlm, monkeypatch):  # noqa: F811
    """``tokens=8.5`` is refused (it was truncated to 8); a second ``generate_until`` on one model object reports
    its own requests, not both calls' together."""
    import torch
    from lmms_eval.models.simple.llava_hf import LlavaHf
    from PIL import Image
    from tokenprune.eval.lmms_models import TokenpruneLlava

    with pytest.raises(ValueError, match="tokens"):
        TokenpruneLlava(pretrained=str(tiny_vlm), device="cpu", dtype="float32", method="hiprune", tokens=8.5,
                        object_layer=1)

    def like_lmms_eval(self, requests):  # one generate per request, each with one image
        for _ in requests:
            inputs = self._image_processor(images=Image.new("RGB", (32, 32)), text="USER: <image>\nwhat ASSISTANT:",
                                           return_tensors="pt")
            with torch.no_grad():
                self.model.generate(**inputs, max_new_tokens=1)
        return ["" for _ in requests]

    monkeypatch.setattr(LlavaHf, "generate_until", like_lmms_eval)
    model = TokenpruneLlava(pretrained=str(tiny_vlm), device="cpu", dtype="float32", method="hiprune", tokens=6,
                            object_layer=1)
    model.generate_until([None, None, None])
    first = model._stats.summary("hiprune", None, 6)
    assert first["images"] == 3 and first["visual_tokens_per_image"] == 6 and first["generate_calls"] == 3
    model.generate_until([None])
    second = model._stats.summary("hiprune", None, 6)
    assert second["images"] == 1 and second["generate_calls"] == 1
