"""transformers ``output_attentions`` / ``output_hidden_states`` on a patched model, per family and method.

Eager attention: every layer's map comes back, at the size the layer attended over, and it is the map
that produced the layer's attention output (checked from the attention module's own input and output).
Hidden states: the embeddings, then each layer's output, at the lengths ``last_forward`` reports.
SDPA returns no maps, as the stock model does. keep=1.0: both are identical to the stock model's.
"""
from __future__ import annotations

import pytest
import torch
from conftest import images
from test_hf_patch import PREFIX, tiny_hf

import tokenprune
from tokenprune.registry import Stage

REDUCING = ["tome", "mctf", "zero-tprune", "random"]


@pytest.fixture(params=sorted(PREFIX))
def hf_family(request) -> str:
    return request.param


def _eager(family: str):
    model = tiny_hf(family)
    model.set_attn_implementation("eager")
    return model


def _encoder_parts(model):
    from tokenprune.patches import hf_vision

    enc = hf_vision._encoder(model)
    return enc.layers, [getattr(layer, enc.family.attention) for layer in enc.layers]


def _outputs(model, x, **kwargs):
    with torch.no_grad():
        out = model(x, **kwargs)
    return out


@pytest.mark.parametrize("method", REDUCING)
def test_every_layer_returns_its_reduced_attention_map_and_hidden_states(hf_family, method):
    model, x = _eager(hf_family), images()
    tokenprune.apply(model, method, keep=0.25)
    layers, attentions = _encoder_parts(model)
    seen = []  # (attention input, attention output, map) of each attention module call

    def record(module, args, kwargs, output):
        h = kwargs.get("hidden_states", args[0] if args else None)
        seen.append((h, output[0], output[1]))

    inputs, outputs = [], []  # of each layer
    handles = [attn.register_forward_hook(record, with_kwargs=True) for attn in attentions]
    handles += [layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for layer in layers]
    handles += [layer.register_forward_hook(lambda m, args, o: outputs.append(o)) for layer in layers]
    out = _outputs(model, x, output_attentions=True, output_hidden_states=True)
    for handle in handles:
        handle.remove()
    report = tokenprune.last_forward(model)
    assert report.output_tokens == PREFIX[hf_family] + 16

    # one map per layer, (B, H, N_l, N_l) with N_l the tokens that layer attended over
    assert len(out.attentions) == len(layers) == len(seen)
    if tokenprune.reducer_of(model).stage is Stage.BEFORE_ATTENTION:  # reduces before its attention
        attended = report.token_counts[1:] + [report.output_tokens]
    else:
        attended = report.token_counts
    heads = model.config.num_attention_heads
    assert [tuple(a.shape) for a in out.attentions] == [(2, heads, n, n) for n in attended]
    for maps, (h, attn_out, weights), attn in zip(out.attentions, seen, attentions):
        assert torch.equal(maps, weights)
        torch.testing.assert_close(maps.sum(dim=-1), torch.ones(maps.shape[:-1]), atol=1e-5, rtol=0)
        # the map is the one that produced the attention output: o_proj(map @ v)
        v = attn.v_proj(h).view(h.shape[0], h.shape[1], heads, -1).transpose(1, 2)
        out_proj = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
        expected = out_proj((maps @ v).transpose(1, 2).reshape(h.shape[0], h.shape[1], -1))
        torch.testing.assert_close(attn_out, expected, atol=1e-5, rtol=1e-4)

    # hidden states: the embeddings, then each layer's output (the tokens entering the next layer)
    assert [h.shape[1] for h in out.hidden_states] == report.token_counts + [report.output_tokens]
    for i, hidden in enumerate(out.hidden_states[:-1]):
        assert torch.equal(hidden, inputs[i])
    assert torch.equal(out.hidden_states[-1], outputs[-1])


@pytest.mark.parametrize("method", ["tome", "mctf"])
def test_config_output_attentions_set_before_apply(method):
    model, x = _eager("vit"), images()
    model.config.output_attentions = True
    tokenprune.apply(model, method, keep=0.25)
    out = _outputs(model, x)
    assert len(out.attentions) == 4
    assert [a.shape[-1] for a in out.attentions][0] == 65


@pytest.mark.parametrize(("method", "attn_implementation"), [(m, "eager") for m in REDUCING] + [("mctf", "sdpa")])
def test_keep_one_outputs_are_the_stock_ones(hf_family, method, attn_implementation):
    model, x = tiny_hf(hf_family), images()
    model.set_attn_implementation(attn_implementation)
    kwargs = dict(output_attentions=True, output_hidden_states=True)
    stock = _outputs(model, x, **kwargs)
    tokenprune.apply(model, method, keep=1.0)
    patched = _outputs(model, x, **kwargs)
    assert len(patched.attentions) == len(stock.attentions) == (4 if attn_implementation == "eager" else 0)
    for a, b in zip(patched.attentions, stock.attentions):
        assert torch.equal(a, b)
    assert len(patched.hidden_states) == len(stock.hidden_states) == 5
    for a, b in zip(patched.hidden_states, stock.hidden_states):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", REDUCING)
def test_sdpa_returns_no_maps_as_the_stock_model(method):
    """transformers' SDPA never returns maps (it warns and asks for eager); the patched model does the same
    in every layer rather than a few maps from the layers that compute probabilities for the method."""
    model, x = tiny_hf("vit"), images()
    tokenprune.apply(model, method, keep=0.25)
    out = _outputs(model, x, output_attentions=True)
    assert out.attentions == ()


@pytest.mark.parametrize("kind", ["script", "trace", "export"])
def test_torchscript_and_export_are_refused_clearly(kind):
    model, x = tiny_hf("vit"), images()
    tokenprune.apply(model, "tome", keep=0.25)
    if kind == "export":
        with pytest.raises(RuntimeError, match=r"torch\.export is not supported.*torch\.compile"):
            torch.export.export(model, (x,))
        return
    model.config.return_dict = False  # what tracing needs
    with pytest.warns(FutureWarning), pytest.raises(RuntimeError, match=rf"torch\.jit\.{kind} is not supported.*"
                                                                         r"torch\.compile"):
        torch.jit.script(model) if kind == "script" else torch.jit.trace(model, x)


def test_torch_compile_of_a_patched_transformers_model():
    model, x = tiny_hf("vit"), images()
    tokenprune.apply(model, "tome", keep=0.25)
    with torch.no_grad():
        expected = model(x).logits
        torch.testing.assert_close(torch.compile(model)(x).logits, expected, atol=1e-5, rtol=1e-4)
    assert tokenprune.last_forward(model).output_tokens == 17
