"""What `tokenprune flops` and `bench` do with models, methods, options and batch sizes they cannot run: one
line, exit 2, no traceback, before anything is counted or timed; and the dual encoders (hf:clip, hf:siglip) they can
run, by their vision tower. (`show`: tests/test_visualize.py; eval's own inputs: tests/test_eval_inputs.py.)"""
from __future__ import annotations

import pytest
import torch
from test_eval_inputs import one_line_error, run_cli
from tokenprune.eval import benchmark as bench

import tokenprune


def never_counted(monkeypatch):
    monkeypatch.setattr(tokenprune, "count_flops", lambda *a, **k: pytest.fail("counted before the model was checked"))


def never_timed(monkeypatch):
    monkeypatch.setattr(bench, "interleaved_medians", lambda *a, **k: pytest.fail("timed a batch that cannot fit"))


@pytest.mark.parametrize("command", ["flops", "bench", "show"])
def test_a_pretrained_tag_the_model_lacks_is_named_with_the_tags_it_has(capsys, command):
    one_line_error([command, "--model", "vit_testbed_fmnist.bogus_tag"], capsys,
                   "unknown pretrained tag 'bogus_tag' in 'vit_testbed_fmnist.bogus_tag'", "has tokenprune_fmnist")


@pytest.mark.parametrize("command", ["flops", "bench"])
def test_a_missing_local_dir_is_named(tmp_path, capsys, command):
    one_line_error([command, "--model", f"local-dir:{tmp_path / 'nope'}"], capsys,
                   f"{tmp_path / 'nope'} is not a folder with a config.json")


@pytest.mark.parametrize("command", ["flops", "bench"])
def test_a_hub_model_neither_cached_nor_reachable_is_one_line(capsys, monkeypatch, command):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 does
    one_line_error([command, "--model", "hf-hub:timm/tokenprune_no_such_model"], capsys,
                   "could not create 'hf-hub:timm/tokenprune_no_such_model'",
                   "hf-hub:<repo> in the Hub's local cache or reachable")


@pytest.mark.parametrize("model_type, model_class", [("bert", "BertModel"), ("gpt2", "GPT2Model")])
def test_flops_checks_the_model_is_supported_before_counting(capsys, monkeypatch, model_type, model_class):
    never_counted(monkeypatch)
    one_line_error(["flops", "--model", f"hf:{model_type}"], capsys, "tokenprune does not support", model_class,
                   "supported: ")


def tiny_dual_encoder(kind: str):
    """hf:clip / hf:siglip's config, shrunk to a 64-patch vision tower and a 2-layer text tower."""
    from transformers import CLIPConfig, SiglipConfig

    vision = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96, image_size=32,
                  patch_size=4)
    text = dict(vocab_size=10, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=64)
    return {"clip": CLIPConfig, "siglip": SiglipConfig}[kind](text_config=text, vision_config=vision)


@pytest.mark.parametrize("kind, tower, output", [("clip", "CLIPVisionModel", 17), ("siglip", "SiglipVisionModel", 16)])
def test_flops_and_bench_run_a_dual_encoders_vision_tower(capsys, monkeypatch, kind, tower, output):
    import transformers

    monkeypatch.setattr(transformers.AutoConfig, "for_model", lambda model_type: tiny_dual_encoder(model_type))
    code, out, err = run_cli(["flops", "--model", f"hf:{kind}", "--keep", "0.25"], capsys)
    assert code == 0, err[-3000:]
    assert f"model hf:{kind} ({tower})" in out and f"-> {output}\n" in out  # 64 patches at keep 0.25, CLIP's class
    monkeypatch.setattr(bench, "interleaved_medians", lambda models, *a: ({name: 1.0 for name in models}, None))
    [row] = bench.benchmark(f"hf:{kind}", keep=0.25, batch_sizes=(2,), repeats=1)
    assert row.ideal_speedup > 1


def test_a_vlm_gives_its_vision_tower_built_alone(capsys, monkeypatch):
    """hf:llava's default config holds a 7B language model (killed for memory here when it was built whole)."""
    import transformers

    def tiny_llava(model_type):
        assert model_type == "llava"
        vision = tiny_dual_encoder("clip").vision_config
        return transformers.LlavaConfig(vision_config=vision.to_dict(), text_config=dict(
            model_type="llama", vocab_size=10, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64))

    built = []
    from_config = transformers.AutoModel.from_config
    monkeypatch.setattr(transformers.AutoConfig, "for_model", tiny_llava)
    monkeypatch.setattr(transformers.AutoModel, "from_config",
                        lambda config, **k: built.append(type(config).__name__) or from_config(config, **k))
    code, out, err = run_cli(["flops", "--model", "hf:llava", "--keep", "0.25"], capsys)
    assert code == 0, err[-3000:]
    assert "model hf:llava (CLIPVisionModel)" in out and "-> 17\n" in out
    assert built == ["CLIPVisionConfig", "CLIPVisionConfig"]  # the skeleton checked, then the tower; no LLaMA


def test_an_unsupported_model_is_refused_before_its_weights_are_allocated(capsys, monkeypatch):
    import transformers

    from_config = transformers.AutoModel.from_config

    def on_meta_only(config, **kwargs):
        assert torch.empty(()).device.type == "meta", "built with real weights before the support check"
        return from_config(config, **kwargs)

    never_counted(monkeypatch)
    monkeypatch.setattr(transformers.AutoModel, "from_config", on_meta_only)
    # Qwen2.5-VL's default vision tower: 3B parameters; tokenprune reduces its tokens as a VLM (eval-vlm) only
    one_line_error(["flops", "--model", "hf:qwen2_5_vl"], capsys, "tokenprune does not support",
                   "Qwen2_5_VisionTransformerPretrainedModel")


@pytest.mark.parametrize("command", ["flops", "bench"])
def test_a_type_whose_vision_config_transformers_cannot_build_alone_is_one_line(capsys, monkeypatch, command):
    # Qwen2-VL's vision config has no AutoModel class: transformers' ValueError listed every config class
    # over many lines
    never_counted(monkeypatch)
    never_timed(monkeypatch)
    # the reason is the first line of transformers' message
    one_line_error([command, "--model", "hf:qwen2_vl"], capsys, "tokenprune does not support hf:qwen2_vl",
                   "Qwen2VLVisionConfig", "for this kind of AutoModel", "supported: ")


@pytest.mark.parametrize("command", ["flops", "bench", "eval"])
def test_keep_as_an_option_points_at_the_keep_flag(capsys, command):
    one_line_error([command, "--method", "tome", "-o", "keep=0.5"], capsys, "'keep=0.5': keep is not a method option",
                   "--keep 0.5")


@pytest.mark.parametrize("batch", ["1000000000", "99999999999999999999999"])
def test_bench_refuses_a_batch_whose_input_cannot_be_allocated(capsys, monkeypatch, batch):
    never_timed(monkeypatch)
    one_line_error(["bench", "--model", "vit_testbed_fmnist", "--batch-sizes", "1", batch, "--repeats", "1"], capsys,
                   f"batch size {batch}: its input alone ({batch} x 1 x 28 x 28 fp32", "give smaller batch sizes")


def test_bench_names_the_batch_whose_forward_runs_out_of_memory(capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 123456789012 bytes.")

    monkeypatch.setattr(bench, "interleaved_medians", out_of_memory)
    one_line_error(["bench", "--model", "vit_testbed_fmnist", "--batch-sizes", "8", "--repeats", "1"], capsys,
                   "batch size 8: the forward ran out of cpu memory")

    def another_failure(*args, **kwargs):
        raise RuntimeError("a kernel failed")

    monkeypatch.setattr(bench, "interleaved_medians", another_failure)
    with pytest.raises(RuntimeError, match="a kernel failed"):  # not blamed on the batch size
        bench.benchmark("vit_testbed_fmnist", batch_sizes=(8,), repeats=1)


def test_check_inputs_fit_refuses_exactly_the_batches_larger_than_memory(monkeypatch):
    per_sample = 3 * 8 * 4 * 2  # (3, 8, 4) in bf16: 192 bytes
    monkeypatch.setattr(bench, "device_memory", lambda device: 2 * per_sample)
    bench.check_inputs_fit((1, 2), (3, 8, 4), torch.bfloat16, torch.device("cpu"))  # 384 bytes: fits exactly
    with pytest.raises(ValueError) as refused:
        bench.check_inputs_fit((1, 2, 3, 4), (3, 8, 4), torch.bfloat16, torch.device("cpu"))
    assert str(refused.value) == ("batch size 3: its input alone (3 x 3 x 8 x 4 bf16, 5.36e-07 GiB) is more than the "
                                  "3.58e-07 GiB of memory this cpu device has; give smaller batch sizes")
    monkeypatch.setattr(bench, "device_memory", lambda device: None)  # the system does not say: nothing refused
    bench.check_inputs_fit((10**12,), (3, 8, 4), torch.float32, torch.device("cpu"))


def test_parse_option_refuses_keep_only():
    from tokenprune.cli import parse_option

    assert parse_option("fast=True") == ("fast", True) and parse_option("layers=[3, 6]") == ("layers", [3, 6])
    assert parse_option("keeper=1") == ("keeper", 1) and parse_option("one_step_ahead=exact") == ("one_step_ahead",
                                                                                                   "exact")


def test_an_interrupted_bench_json_write_leaves_the_old_file(tmp_path, monkeypatch):
    """--json is written beside its name and renamed over it: interrupted before the rows are written, the old file is
    still whole (opened for writing in place, it was already emptied)."""
    from tokenprune.cli import main as cli

    out = tmp_path / "b.json"
    out.write_text("[the old rows]")
    monkeypatch.setattr(bench, "benchmark", lambda *args, **kwargs: [])

    def interrupted(rows):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "rows_to_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli(["bench", "--model", "vit_testbed_fmnist", "--json", str(out)])
    assert out.read_text() == "[the old rows]" and [p.name for p in tmp_path.iterdir()] == ["b.json"]
