"""A patched model in ordinary PyTorch / timm / transformers workflows: hooks, tracing, saving and loading,
dtype changes, training, threads, compiling, and apply / remove in every order."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import assert_threads_get_what_each_gets_alone, images, tiny_timm
from test_hf_patch import tiny_hf
from timm.layers import Attention
from timm.models.vision_transformer import Block

import tokenprune

ENCODER_METHODS = ["tome", "mctf", "zero-tprune", "random"]


def run(model, x, **kwargs):
    with torch.inference_mode():
        out = model(x, **kwargs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_same_state_dict(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


# ------------------------------------------------------------------ hooks on a patched timm model

@pytest.mark.parametrize("method", ENCODER_METHODS)
def test_timm_attention_forward_hooks_run_in_reducing_blocks(method):
    """A forward hook on a block's attention runs in every block, reducing or not, at the size the block attends
    over, and what it returns is the attention's output: a hook returning zeros is a zero output projection. (The
    reducing blocks ran the attention's parts without calling the module, so its hooks were skipped there.)"""
    x = images()
    hooked = tiny_timm()
    zeroed = copy.deepcopy(hooked)
    for block in zeroed.blocks:
        torch.nn.init.zeros_(block.attn.proj.weight)
        torch.nn.init.zeros_(block.attn.proj.bias)
    sizes = []

    def zero_output(module, args, output):
        sizes.append(output.shape[1])
        return torch.zeros_like(output)

    for block in hooked.blocks:
        block.attn.register_forward_hook(zero_output)
    for model in (hooked, zeroed):
        tokenprune.apply(model, method, keep=0.5)
    expected = run(zeroed, x)
    assert torch.equal(run(hooked, x), expected)
    report = tokenprune.last_forward(hooked)
    assert len(sizes) == len(hooked.blocks) and report.output_tokens < report.token_counts[0]
    if method != "mctf":  # MCTF reduces before attention: its attention runs on the reduced tokens
        assert sizes == report.token_counts
    tokenprune.remove(hooked)
    assert all(type(block.attn) is Attention for block in hooked.blocks)
    assert len(hooked.blocks[0].attn._forward_hooks) == 1  # the user's hook stays


def test_timm_hooks_on_the_block_sequence_run_while_reducing():
    """``model.blocks`` (the block sequence timm calls in one go) sees a reducing forward as the stock model's:
    its forward hook gets the reduced tokens the final norm receives."""
    model, x = tiny_timm(), images()
    captured = []
    model.blocks.register_forward_hook(lambda module, args, output: captured.append(output))
    tokenprune.apply(model, "tome", keep=0.5)
    features = run(model.forward_features, x)
    assert len(captured) == 1 and captured[0].shape[1] == tokenprune.last_forward(model).output_tokens == 33
    with torch.inference_mode():
        assert torch.equal(model.norm(captured[0]), features)
    tokenprune.remove(model)
    assert type(model.blocks) is torch.nn.Sequential and len(model.blocks._forward_hooks) == 1


def test_torch_fx_tracing_of_a_patched_timm_model_is_refused_in_one_line():
    """torch.fx (timm's feature extraction by graph too) cannot follow the per-forward state: one clear error, not
    ``type Proxy doesn't define __round__`` from deep inside the schedule; the stock model traces after remove."""
    model, x = tiny_timm(), images()
    tokenprune.apply(model, "tome", keep=0.5)
    with pytest.raises(RuntimeError, match=r"torch\.fx.*not supported on a patched model"):
        torch.fx.symbolic_trace(model)
    tokenprune.apply(model, "tome", keep=1.0)  # even reducing nothing: the patched forward is still Python state
    with pytest.raises(RuntimeError, match=r"torch\.fx"):
        torch.fx.symbolic_trace(model)
    tokenprune.remove(model)
    assert torch.equal(torch.fx.symbolic_trace(model)(x), run(model, x))


def test_block_hooks_see_the_reduced_sizes_and_remove_keeps_user_hooks():
    model, x = tiny_timm(), images()
    seen = []
    handles = [block.register_forward_hook(lambda module, args, output: seen.append(output.shape[1]))
               for block in model.blocks]
    tokenprune.apply(model, "tome", keep=0.5)
    run(model, x)
    report = tokenprune.last_forward(model)
    assert seen == report.token_counts[1:] + [report.output_tokens]
    tokenprune.remove(model)
    assert all(len(block._forward_hooks) == 1 for block in model.blocks)
    for handle in handles:
        handle.remove()


# ------------------------------------------------------------------ state_dict, saving, loading

@pytest.mark.parametrize("method", ENCODER_METHODS)
def test_state_dict_of_a_patched_timm_model_is_the_stock_one_and_loads_both_ways(method):
    model, x = tiny_timm(), images()
    stock_state = copy.deepcopy(model.state_dict())
    tokenprune.apply(model, method, keep=0.5)
    assert_same_state_dict(model.state_dict(), stock_state)
    other = tiny_timm(seed=5)
    tokenprune.apply(other, method, keep=0.5)
    other.load_state_dict(stock_state, strict=True)  # a stock checkpoint into a patched model
    assert torch.equal(run(other, x), run(model, x))
    fresh = tiny_timm(seed=5)
    fresh.load_state_dict(model.state_dict(), strict=True)  # a patched model's checkpoint into a stock one
    assert torch.equal(run(fresh, x), run(tiny_timm(), x))


def test_timm_checkpoint_and_torch_save_of_a_patched_model(tmp_path):
    model, x = tiny_timm(), images()
    stock = run(model, x)
    tokenprune.apply(model, "mctf", keep=0.5)
    pruned = run(model, x)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "checkpoint.pth")
    loaded = tiny_timm(seed=3, checkpoint_path=str(tmp_path / "checkpoint.pth"))
    assert not tokenprune.is_patched(loaded) and torch.equal(run(loaded, x), stock)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    whole = torch.load(buffer, weights_only=False)
    assert tokenprune.reducer_of(whole).name == "mctf" and torch.equal(run(whole, x), pruned)
    tokenprune.remove(whole)
    assert torch.equal(run(whole, x), stock)


@pytest.mark.parametrize("family", ["vit", "clip", "dinov2"])
def test_save_pretrained_of_a_patched_hf_model_saves_the_stock_model(family, tmp_path):
    """The same files as the stock model's (config and weights); loading them gives the stock, unpatched model."""
    import json

    from safetensors.torch import load_file

    model, x = tiny_hf(family), images()
    stock = run(model, x)
    model.save_pretrained(tmp_path / "stock")
    tokenprune.apply(model, "tome", keep=0.5)
    pruned = run(model, x)
    model.save_pretrained(tmp_path / "patched")
    saved = {name: json.loads((tmp_path / name / "config.json").read_text()) for name in ("stock", "patched")}
    assert saved["patched"] == saved["stock"]
    weights = {name: load_file(tmp_path / name / "model.safetensors") for name in ("stock", "patched")}
    assert_same_state_dict(weights["patched"], weights["stock"])
    loaded = type(model).from_pretrained(tmp_path / "patched").eval()
    assert not tokenprune.is_patched(loaded)
    assert not any(type(m).__name__.startswith("TokenPruned") for m in loaded.modules())
    assert torch.equal(run(loaded, x), stock)
    assert tokenprune.is_patched(model) and torch.equal(run(model, x), pruned)  # saving left the patch alone


# ------------------------------------------------------------------ dtypes, gradients, grad modes

@pytest.mark.parametrize("method", ENCODER_METHODS)
def test_double_after_apply_is_the_stock_double_model_at_keep_one(method):
    model, x = tiny_timm(), images().double()
    stock = run(copy.deepcopy(model).double(), x)
    tokenprune.apply(model, method, keep=1.0)
    model.double()
    assert torch.equal(run(model, x), stock)
    tokenprune.apply(model, method, keep=0.5)
    assert run(model, x).dtype == torch.float64 and tokenprune.last_forward(model).output_tokens == 33


@pytest.mark.parametrize("build", [tiny_timm, lambda: tiny_hf("vit")], ids=["timm", "hf"])
@pytest.mark.parametrize("method", ENCODER_METHODS)
def test_training_backward_reaches_the_input_and_every_parameter(build, method):
    model = build()
    tokenprune.apply(model, method, keep=0.5)
    model.train()
    x = images().requires_grad_(True)
    out = model(x)
    (out if isinstance(out, torch.Tensor) else out.logits).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused
    assert tokenprune.last_forward(model).output_tokens < tokenprune.last_forward(model).token_counts[0]


@pytest.mark.parametrize("method", ENCODER_METHODS)
def test_grad_modes_give_the_same_output(method):
    model, x = tiny_timm(), images()
    tokenprune.apply(model, method, keep=0.5)
    with torch.inference_mode():
        inference = model(x)
    with torch.no_grad():
        no_grad = model(x)
    enabled = model(x.clone().requires_grad_(True))
    assert torch.equal(inference, no_grad) and torch.equal(enabled.detach(), no_grad)


# ------------------------------------------------------------------ threads, batch and input sizes

@pytest.mark.parametrize("family", ["vit", "dinov2", "siglip"])
@pytest.mark.parametrize("method", ENCODER_METHODS)
def test_hf_threads_get_what_each_would_get_alone(family, method):
    model = tiny_hf(family)
    tokenprune.apply(model, method, keep=0.4)
    inputs = [images(3, seed=1), images(1, seed=2), images(5, seed=3)]
    assert_threads_get_what_each_gets_alone(lambda x: run(model, x), inputs, rounds=3)


@pytest.mark.parametrize("method", ENCODER_METHODS)
def test_timm_threads_of_every_method_get_what_each_would_get_alone(method):
    model = tiny_timm(dynamic_img_size=True)
    tokenprune.apply(model, method, keep=0.4)
    inputs = [images(3, 32, seed=1), images(1, 48, seed=2), images(2, 40, seed=3)]
    assert_threads_get_what_each_gets_alone(lambda x: run(model, x), inputs, rounds=3)


@pytest.mark.parametrize("family", ["vit", "dinov2", "clip", "siglip"])
def test_hf_input_sizes_in_a_row_are_each_scheduled(family):
    model = tiny_hf(family)
    tokenprune.apply(model, "tome", keep=0.5)
    prefix = 0 if family == "siglip" else 1
    kwargs = {} if family == "dinov2" else {"interpolate_pos_encoding": True}
    for size, patches in [(32, 64), (48, 144), (24, 36), (32, 64)]:
        run(model, images(2, size), **kwargs)
        report = tokenprune.last_forward(model)
        assert report.token_counts[0] == prefix + patches and report.output_tokens == prefix + round(patches / 2)


# ------------------------------------------------------------------ apply / remove in every order

def test_apply_remove_apply_and_switching_methods_equal_a_fresh_apply():
    x = images()
    stock = run(tiny_timm(), x)
    model = tiny_timm()
    for method, keep in [("tome", 0.5), ("mctf", 0.25), ("zero-tprune", 0.5), ("random", 0.5), ("tome", 1.0)]:
        tokenprune.apply(model, method, keep=keep)
        assert tokenprune.last_forward(model) is None  # a new configuration has no forward yet
        fresh = tiny_timm()
        tokenprune.apply(fresh, method, keep=keep)
        assert torch.equal(run(model, x), run(fresh, x))
        assert tokenprune.last_forward(model).method == method
    assert torch.equal(run(model, x), stock)
    tokenprune.remove(model)
    for call in (tokenprune.remove, tokenprune.last_forward, tokenprune.reducer_of):
        with pytest.raises(ValueError, match="not patched"):
            call(model)
    tokenprune.apply(model, "mctf", keep=0.25)
    fresh = tiny_timm()
    tokenprune.apply(fresh, "mctf", keep=0.25)
    assert torch.equal(run(model, x), run(fresh, x))


def test_apply_to_a_hf_submodule_then_to_its_parent_is_one_patch():
    model, x = tiny_hf("vit"), images()
    stock = run(model, x)
    tokenprune.apply(model.vit, "tome", keep=0.5)
    assert tokenprune.is_patched(model)
    tokenprune.apply(model, "mctf", keep=0.25)  # the same encoder: re-configured, not patched twice
    run(model, x)
    assert tokenprune.last_forward(model.vit).method == "mctf" and tokenprune.last_forward(model).output_tokens == 17
    assert len(model.vit._forward_pre_hooks) == len(model.vit._forward_hooks) == 1  # ViTModel runs its layer loop
    tokenprune.remove(model.vit)
    assert not tokenprune.is_patched(model) and torch.equal(run(model, x), stock)
    assert not any(type(m).__name__.startswith("TokenPruned") for m in model.modules())


def test_a_refused_reconfiguration_leaves_the_running_patch_and_its_outputs():
    model, x = tiny_timm(), images()
    tokenprune.apply(model, "mctf", keep=0.5)
    before = run(model, x)
    reducer = tokenprune.reducer_of(model)
    for bad in (dict(method="tome", keep=2.0), dict(method="tome", r=-1), dict(method="hiprune"),
                dict(method="tome", keep=0.5, positions="original"), dict(method="tome", keep=0.001)):
        with pytest.raises((TypeError, ValueError)):
            tokenprune.apply(model, **bad)
        assert tokenprune.reducer_of(model) is reducer
        assert torch.equal(run(model, x), before)
    tokenprune.remove(model)
    assert type(model).__name__ == "VisionTransformer" and all(type(b) is Block for b in model.blocks)


# ------------------------------------------------------------------ torch.compile around apply / remove

def test_a_compiled_model_follows_apply_reconfigure_and_remove():
    torch._dynamo.reset()
    model, x = tiny_timm(depth=2), images()
    stock = run(model, x)
    compiled = torch.compile(model)
    assert torch.allclose(run(compiled, x), stock, atol=1e-5)
    for keep in (0.5, 0.25):
        tokenprune.apply(model, "tome", keep=keep)
        eager = run(model, x)
        eager_report = tokenprune.last_forward(model)
        assert torch.allclose(run(compiled, x), eager, atol=1e-5)
        report = tokenprune.last_forward(model)
        assert report.token_counts == eager_report.token_counts and report.output_tokens == eager_report.output_tokens
        assert torch.equal(report.size, eager_report.size)
    tokenprune.remove(model)
    assert torch.allclose(run(compiled, x), stock, atol=1e-5)


# ------------------------------------------------------------------ inspection of a VLM's vision tower

def test_a_vlm_tower_an_encoder_method_reduces_in_is_patched_and_reports_its_forward():
    """The tower of a LLaVA patched with an encoder method reduces tokens: ``is_patched`` says so (it said False,
    and ``last_forward(tower)`` "not patched by tokenprune"), its report is the tower's last forward; apply and
    remove stay refused on the tower alone."""
    from test_vlm import llava_batch, tiny_llava

    model, inputs = tiny_llava(), llava_batch()
    tower = model.model.vision_tower
    tokenprune.apply(model, "tome", keep=0.25)
    assert tokenprune.is_patched(tower) and tokenprune.reducer_of(tower) is tokenprune.reducer_of(model)
    assert tokenprune.last_forward(tower) is None
    with torch.no_grad():
        model(**inputs)
    report = tokenprune.last_forward(tower)
    assert report.method == "tome" and report.token_counts[0] == 65 and report.output_tokens == 1 + 16
    with pytest.raises(TypeError, match="belongs to a patched LlavaForConditionalGeneration"):
        tokenprune.remove(tower)
    tokenprune.remove(model)
    assert not tokenprune.is_patched(tower)
    with pytest.raises(ValueError, match="not patched"):
        tokenprune.last_forward(tower)


def test_a_block_sequence_set_after_apply_still_reduces():
    model, x = tiny_timm(), images()
    tokenprune.apply(model, "tome", keep=0.5)
    expected = run(model, x)
    model.blocks = torch.nn.Sequential(*model.blocks)  # a new sequence of the same (patched) blocks
    assert torch.equal(run(model, x), expected) and tokenprune.last_forward(model).output_tokens == 33
    tokenprune.remove(model)
    assert type(model.blocks) is torch.nn.Sequential and all(type(b) is Block for b in model.blocks)


# ------------------------------------------------------------------ torch.export of transformers towers

@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("method", ["mctf", "zero-tprune"])
def test_torch_export_of_a_patched_clip_or_siglip_tower_is_the_eager_forward(family, method):
    """ViT, DeiT and DINOv2 are refused under torch.export (transformers builds a mask there, test_hf_outputs.py);
    CLIP and SigLIP towers build none and export the reducing forward as it runs eagerly (README)."""
    model, x = tiny_hf(family), images()
    tokenprune.apply(model, method, keep=0.5)
    expected = run(model, x)
    with torch.no_grad():
        exported = torch.export.export(model, (x,)).module()(x).last_hidden_state
    assert exported.shape == expected.shape == (2, (family == "clip") + 32, 48)
    torch.testing.assert_close(exported, expected, atol=1e-5, rtol=1e-5)
