"""What the stock model runs for a submodule runs in a reducing forward too (a backward hook, a global module hook,
an instance-level forward wrapper, a registered attention function): no submodule's work is done past the module
(reading its ``weight``, or dispatching its work itself) where the stock model would run something more.

The timm tests compare a model whose qkv is a plain ``nn.Linear`` (which ``TimmAttention.splits_projection`` may
slice) with the same model whose qkv is a do-nothing ``nn.Linear`` subclass (which it runs as a module): the two
compute the same thing in the stock model, so a patched model must give the same result for both."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import images, tiny_timm
from torch import nn

import tokenprune


class SameLinear(nn.Linear):
    """An ``nn.Linear`` subclass that adds nothing: the patch runs it as a module (not plain ``nn.Linear``)."""


def as_module_path(model):
    """A copy of ``model`` whose qkv projections are ``SameLinear``: same parameters, same stock output."""
    other = copy.deepcopy(model)
    for block in other.blocks:
        block.attn.qkv.__class__ = SameLinear
    return other


def _mctf_pair(qkv_bias=True):
    plain = tiny_timm(qkv_bias=qkv_bias)
    if qkv_bias:  # timm initialises biases to zero: a split that lost them would go unseen
        with torch.no_grad():
            for block in plain.blocks:
                block.attn.qkv.bias.normal_(std=0.5)
    module = as_module_path(plain)
    x = images()
    with torch.inference_mode():
        torch.testing.assert_close(plain(x), module(x), rtol=0, atol=0)  # stock: the same model
    for model in (plain, module):
        tokenprune.apply(model, "mctf", keep=0.5)
    return plain, module, x


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_timm_mctf_split_projection_equals_the_module_call(qkv_bias):
    """Without anything around it, a plain qkv's q/k-only and v-only projections (slices of its weight and bias)
    give what the module's call gives, split."""
    plain, module, x = _mctf_pair(qkv_bias)
    with torch.inference_mode():
        torch.testing.assert_close(plain(x), module(x))
    assert tokenprune.last_forward(plain).token_counts == tokenprune.last_forward(module).token_counts


def test_the_flop_counter_counts_the_split_projection_a_plain_qkv_runs():
    """``torch.utils.flop_counter`` tracks modules with global module hooks: they must not turn MCTF's split
    projection into the module's two full calls, or ``count_flops`` would count a forward that does not run."""
    from torch.utils.flop_counter import FlopCounterMode

    plain, module, x = _mctf_pair()
    flops = {}
    for name, model in (("plain", plain), ("module", module)):
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(x)
        flops[name] = counter.get_total_flops()
    report = tokenprune.last_forward(plain)
    dim, n = plain.embed_dim, report.token_counts
    merging = [(entering, left) for entering, left in zip(n, n[1:] + [report.output_tokens]) if left < entering]
    # the module's call projects q, k and v of all tokens, then again of the merged ones: 2 * dim more MACs per
    # token of the block's input (its v) and 4 * dim per merged token (their q and k)
    extra = sum(2 * x.shape[0] * dim * (dim * entering + 2 * dim * left) for entering, left in merging)
    assert merging and flops["module"] - flops["plain"] == extra


def _scale_qkv_gradients(qkvs):
    def hook(module, grad_input, grad_output):
        return tuple(None if g is None else g * 0.5 for g in grad_input) if id(module) in qkvs else None
    return hook


def _scale_qkv_output_gradients(qkvs):
    def hook(module, grad_output):
        return tuple(None if g is None else g * 0.5 for g in grad_output) if id(module) in qkvs else None
    return hook


GLOBAL_HOOKS = {  # register function, hook on the qkv modules (by id)
    "forward": ("register_module_forward_hook", lambda qkvs: lambda m, a, out: out + 0.1 if id(m) in qkvs else None),
    "forward_pre": ("register_module_forward_pre_hook",
                    lambda qkvs: lambda m, args: (args[0] * 1.1,) if id(m) in qkvs else None),
    "full_backward": ("register_module_full_backward_hook", _scale_qkv_gradients),
    "full_backward_pre": ("register_module_full_backward_pre_hook", _scale_qkv_output_gradients),
}


@pytest.mark.parametrize("kind", sorted(GLOBAL_HOOKS))
def test_timm_mctf_global_module_hooks_of_every_kind_see_qkv(kind):
    """Global module hooks of each kind (torch keeps each in its own global) run on a plain qkv as on any module."""
    plain, module, x = _mctf_pair()
    qkvs = {id(block.attn.qkv) for model in (plain, module) for block in model.blocks}
    register, make = GLOBAL_HOOKS[kind]
    handle = getattr(nn.modules.module, register)(make(qkvs))
    grads, outs = {}, {}
    try:
        for name, model in (("plain", plain), ("module", module)):
            inp = x.clone().requires_grad_(True)
            outs[name] = model(inp)
            outs[name].sum().backward()
            grads[name] = inp.grad
    finally:
        handle.remove()
    torch.testing.assert_close(outs["plain"], outs["module"])
    torch.testing.assert_close(grads["plain"], grads["module"])


def test_timm_mctf_backward_hook_on_plain_qkv_applies():
    """A full backward hook on ``attn.qkv`` (here: it halves the gradient reaching the projection's input, as a
    gradient-scaling / attribution hook may) runs in the stock model's every block; MCTF's merging blocks compute
    q/k and v with F.linear on the plain linear's weight slices, so the hook never runs there, silently."""
    plain, module, x = _mctf_pair()
    calls = {"plain": 0, "module": 0}

    def halve(name):
        def hook(mod, grad_input, grad_output):
            calls[name] += 1
            return tuple(None if g is None else g * 0.5 for g in grad_input)
        return hook

    grads = {}
    for name, model in (("plain", plain), ("module", module)):
        for block in model.blocks:
            block.attn.qkv.register_full_backward_hook(halve(name))
        inp = x.clone().requires_grad_(True)
        model(inp).sum().backward()
        grads[name] = inp.grad
    assert tokenprune.last_forward(plain).token_counts == tokenprune.last_forward(module).token_counts
    torch.testing.assert_close(grads["plain"], grads["module"])
    assert calls["plain"] == calls["module"], calls


def test_timm_mctf_global_module_forward_hook_sees_qkv():
    """A global module forward hook (``torch.nn.modules.module.register_module_forward_hook``, as torch's own module
    trackers use) runs for every module call of the stock model, qkv's included; in MCTF's merging blocks a plain qkv
    is never called, so a hook that changes its output (here: adds 0.1) changes the module path only."""
    plain, module, x = _mctf_pair()
    qkvs = {id(block.attn.qkv) for model in (plain, module) for block in model.blocks}

    def shift(mod, args, output):
        return output + 0.1 if id(mod) in qkvs else None

    handle = nn.modules.module.register_module_forward_hook(shift)
    try:
        with torch.inference_mode():
            out_plain, out_module = plain(x), module(x)
    finally:
        handle.remove()
    torch.testing.assert_close(out_plain, out_module)


def test_timm_mctf_accelerate_hook_on_qkv_applies():
    """accelerate's ``add_hook_to_module`` wraps a module's ``forward`` on the instance (its class stays
    ``nn.Linear`` and it has no torch hooks); a ``ModelHook`` that adjusts the output (here: adds 0.1) applies in the
    stock model's every block, but MCTF's merging blocks slice the weight past the wrapped forward."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Shift(ModelHook):
        def post_forward(self, module, output):
            return output + 0.1

    plain, module, x = _mctf_pair()
    for model in (plain, module):
        for block in model.blocks:
            add_hook_to_module(block.attn.qkv, Shift())
    with torch.inference_mode():
        torch.testing.assert_close(plain(x), module(x))


def test_hf_registered_eager_override_runs_in_reducing_layers():
    """transformers' attention modules look their function up with ``ALL_ATTENTION_FUNCTIONS.get_interface(name,
    eager_attention_forward)``, so an ``eager`` set on ``ALL_ATTENTION_FUNCTIONS`` (or registered with
    ``AttentionInterface``) replaces the modeling file's one in the stock model. tokenprune's
    ``hf_attention.implementation`` returns the modeling file's ``eager_attention_forward`` for "eager" without
    asking the interface: ToMe's reducing layers (all of them here) run the modeling file's eager, not the override.
    (zero-tprune's explicit-probabilities path calls no attention function at all, by design: it needs the map.)"""
    from test_hf_patch import tiny_hf
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.vit.modeling_vit import eager_attention_forward

    calls = []

    def counting_eager(module, query, key, value, attention_mask, **kwargs):
        calls.append(query.shape[-2])
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    model = tiny_hf("vit")
    model.set_attn_implementation("eager")
    x = torch.randn(1, 3, model.config.image_size, model.config.image_size)
    ALL_ATTENTION_FUNCTIONS["eager"] = counting_eager
    try:
        with torch.inference_mode():
            model(pixel_values=x)
        assert len(calls) == model.config.num_hidden_layers  # the stock model runs the override in every layer
        calls.clear()
        tokenprune.apply(model, "tome", keep=0.5)
        with torch.inference_mode():
            model(pixel_values=x)
        report = tokenprune.last_forward(model)
    finally:
        del ALL_ATTENTION_FUNCTIONS["eager"]
    assert calls == report.token_counts, (calls, report.token_counts)


def test_vlm_registered_eager_override_runs_in_the_routed_tower_at_keep_one():
    """The same lookup in the VLM adapter's routed attention (``scoring_attention`` -> ``implementation``): a LLaVA
    tower under "eager" with an overridden eager function runs the override in every layer stock, and in none once
    HiPrune is applied, even at keep=1.0 (which the adapter promises runs the stock model)."""
    from test_vlm import llava_batch, tiny_llava
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.clip.modeling_clip import CLIPAttention
    from transformers.models.clip.modeling_clip import eager_attention_forward as clip_eager

    calls = []

    def counting_eager(module, query, key, value, attention_mask, **kwargs):
        if isinstance(module, CLIPAttention):
            calls.append(query.shape[-2])
            return clip_eager(module, query, key, value, attention_mask, **kwargs)
        from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager
        return llama_eager(module, query, key, value, attention_mask, **kwargs)

    model = tiny_llava()
    model.set_attn_implementation("eager")
    batch = llava_batch()
    ALL_ATTENTION_FUNCTIONS["eager"] = counting_eager
    try:
        with torch.inference_mode():
            model(**batch)
        stock = list(calls)
        assert stock, "the stock tower runs the override"
        calls.clear()
        tokenprune.apply(model, "hiprune", keep=1.0, object_layer=2)
        with torch.inference_mode():
            model(**batch)
    finally:
        del ALL_ATTENTION_FUNCTIONS["eager"]
    assert calls == stock


def _timm_targets(model):
    return {"model": model, "blocks": model.blocks, "block": model.blocks[1], "attention": model.blocks[1].attn}


def _hf_targets(model):
    layer = next(m for m in model.modules() if type(m).__name__ == "ViTLayer")
    return {"layer": layer, "attention": layer.attention}


@pytest.mark.parametrize("framework, target", [("timm", t) for t in ("model", "blocks", "block", "attention")]
                         + [("hf", t) for t in ("layer", "attention")])
@pytest.mark.parametrize("accelerate_hook", [True, False])
def test_a_module_whose_forward_is_set_on_the_instance_is_refused(framework, target, accelerate_hook):
    """The patch gives these modules another class; a ``forward`` set on the instance (accelerate's hooks, from
    device_map or offloading, or a user's) wins over any class's, so the patched forward would not run: the stock
    one ran instead (an HF layer silently reduced nothing, a timm avg-pool head averaged merged tokens unweighted)
    or failed on the patch's arguments. Refused at apply, naming the module and the remedy; nothing patched."""
    from accelerate.hooks import ModelHook, add_hook_to_module
    from test_hf_patch import tiny_hf

    model = tiny_timm(global_pool="avg") if framework == "timm" else tiny_hf("vit")
    module = (_timm_targets if framework == "timm" else _hf_targets)(model)[target]
    if accelerate_hook:
        add_hook_to_module(module, ModelHook())
        remedy = "accelerate's hook"
    else:
        module.forward = module.forward  # a bound method of its class, set on the instance
        remedy = "delete the instance attribute"
    with pytest.raises(TypeError, match=f"forward is set on the instance.*{remedy}"):
        tokenprune.apply(model, "tome", keep=0.5)
    assert not tokenprune.is_patched(model)
    assert all(type(m).__module__.split(".")[0] in ("timm", "transformers", "torch") for m in model.modules())


def test_an_accelerate_hook_on_a_transformers_model_itself_is_not_refused():
    """transformers' adapter swaps no class above the encoder's layers: a hook on the model (accelerate's on the
    top module, as dispatch_model sets) runs around the patched forward, which gives what it gives without it."""
    from accelerate.hooks import ModelHook, add_hook_to_module
    from test_hf_patch import tiny_hf

    plain = tiny_hf("vit")
    hooked = copy.deepcopy(plain)
    add_hook_to_module(hooked, ModelHook())
    x = torch.randn(2, 3, plain.config.image_size, plain.config.image_size)
    for model in (plain, hooked):
        tokenprune.apply(model, "tome", keep=0.5)
    with torch.inference_mode():
        torch.testing.assert_close(hooked(pixel_values=x)[0], plain(pixel_values=x)[0], rtol=0, atol=0)
    assert tokenprune.last_forward(hooked).token_counts == tokenprune.last_forward(plain).token_counts
