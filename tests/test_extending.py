"""docs/design.md's worked examples run as written: a new encoder method and a new VLM visual-token
selector, each one file (plus its registration line), reach every model family with no adapter touched."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import images, tiny_timm
from test_vlm import GREEDY, llava_batch, qwen_batch, tiny_llava, tiny_qwen

import tokenprune
from tokenprune import registry

DESIGN = Path(__file__).resolve().parent.parent / "docs" / "design.md"


def example(name: str) -> str:
    """The ```python block that follows the marker ``<!-- example: name ...-->`` in docs/design.md."""
    match = re.search(rf"<!-- example: {re.escape(name)}\b.*?-->\s*```python\n(.*?)```", DESIGN.read_text(), re.S)
    assert match, f"docs/design.md has no example {name!r}"
    return match.group(1)


@pytest.fixture
def registered():
    """Run an example's code (which registers its method); unregister it afterwards."""
    added = []

    def run(name: str):
        before = set(registry.method_names())
        namespace: dict = {}
        exec(compile(example(name), f"docs/design.md:{name}", "exec"), namespace)
        added.extend(set(registry.method_names()) - before)
        assert len(added) == 1, f"the example {name!r} registers one method, got {added}"
        return registry.get_method(added[0])

    yield run
    for name in added:
        registry._METHODS.pop(name)


def test_the_encoder_method_example_runs_on_timm_and_transformers(registered):
    from test_hf_patch import run, tiny_hf

    cls = registered("encoder-method")
    assert "norm-drop" in tokenprune.methods()
    for build in (tiny_timm, lambda: tiny_hf("vit")):
        model, x = build(), images()
        expected = run(model, x)
        tokenprune.apply(model, "norm-drop", keep=1.0)
        assert torch.equal(run(model, x), expected)
        tokenprune.apply(model, "norm-drop", keep=0.25)
        assert not torch.equal(run(model, x), expected)
        report = tokenprune.last_forward(model)
        assert report.method == "norm-drop"
        assert report.output_tokens - report.num_prefix_tokens == 16  # round(0.25 * 64) patch tokens
        tokenprune.apply(model, "norm-drop", r=4)  # the native option of its base class
        run(model, x)
        assert tokenprune.last_forward(model).token_counts[:3] == [65, 61, 57]
    assert issubclass(cls, tokenprune.EncoderReducer)


def test_the_encoder_method_example_keeps_the_largest_norm_tokens(registered):
    registered("encoder-method")
    model, x = tiny_timm(depth=1), images()
    tokenprune.apply(model, "norm-drop", r=8)
    kept = []
    model.blocks[0].mlp.register_forward_pre_hook(lambda m, args: kept.append(args[0]))
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        block = model.blocks[0]
        after_attention = tokens + block.ls1(block.attn(block.norm1(tokens)))
        model(x)
    norms = after_attention[:, 1:].norm(dim=-1)
    for b in range(x.shape[0]):
        largest = sorted(norms[b].topk(56).indices.tolist())
        torch.testing.assert_close(block.norm2(after_attention[b, [0] + [i + 1 for i in largest]]), kept[0][b])


@pytest.mark.parametrize("build,batch,per_image", [(tiny_llava, llava_batch, [16, 32]),
                                                  (tiny_qwen, qwen_batch, [6, 4])])
def test_the_selector_example_runs_on_llava_and_qwen(registered, build, batch, per_image):
    registered("visual-token-selector")
    model, inputs = build(), batch()
    with torch.no_grad():
        expected = model.generate(**inputs, **GREEDY)
        tokenprune.apply(model, "top-attention", keep=1.0)
        assert torch.equal(model.generate(**inputs, **GREEDY), expected)
        tokenprune.apply(model, "top-attention", keep=0.25)
        model.generate(**inputs, **GREEDY)
    assert tokenprune.last_forward(model).visual_tokens == per_image
    with pytest.raises(TypeError, match="top-attention is a visual-token selector"):
        tokenprune.apply(tiny_timm(), "top-attention", keep=0.5)


def test_the_registration_line_in_the_docs_is_the_real_one():
    """The docs' diff of ``tokenprune/methods/__init__.py`` starts from the file as it is."""
    removed = re.search(r"```diff\n-(.*)\n\+(.*)\n```", DESIGN.read_text())
    assert removed, "docs/design.md has no registration diff"
    init = (DESIGN.parent.parent / "tokenprune" / "methods" / "__init__.py").read_text().splitlines()
    assert removed.group(1) in init
    assert removed.group(2).replace("norm_drop, ", "") == removed.group(1)
