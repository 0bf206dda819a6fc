"""The vLLM plugin (tokenprune.vllm) on a tiny random LLaVA of the VLM testbed's architecture (196 visual
tokens, a 4-layer Llama with head size 32, which vLLM's CPU attention takes). These tests need vLLM, so they
run in its own environment (`make vllm-test`, a CI step); the main suite skips them."""
from __future__ import annotations

import pytest
from stock_vllm import stock_vllm

pytest.importorskip("vllm")

from tokenprune.vllm import check  # noqa: E402
from tokenprune.vllm.selection import selector_from  # noqa: E402

PROMPTS = 6  # several requests in one batch, with prompts of different lengths and different images


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Saved by today's transformers (the tower without "vision_model.", which only the plugin's model loads)."""
    return check.save_random_testbed(tmp_path_factory.mktemp("llava") / "model")


@pytest.fixture(scope="module")
def legacy_model(tmp_path_factory):
    """The same weights in transformers 4's layout, which vLLM's own LLaVA loads."""
    return check.save_random_testbed(tmp_path_factory.mktemp("llava4") / "model", legacy_layout=True)


@pytest.fixture(scope="module")
def prompts(model):
    from transformers import AutoProcessor

    return check.testbed_prompts(AutoProcessor.from_pretrained(model), PROMPTS)


def test_hiprune_in_vllm_keeps_the_budget_and_matches_transformers(model, prompts):
    """vLLM's prompts hold exactly the budgeted visual tokens per image (a third of 196: 65), the kept indices
    equal the transformers adapter's, and so do the greedy generations of a batch of requests."""
    result = check.compare(model, {"method": "hiprune", "keep": 1 / 3}, prompts, max_new_tokens=6)
    assert result.visual_tokens == result.budget == [65] * PROMPTS
    assert all(result.kept_equal) and len(result.kept_equal) == PROMPTS
    assert all(result.tokens_equal) and len(result.tokens_equal) == PROMPTS
    assert max(result.logprob_gap) <= check.LOGPROB_TOLERANCE and result.ok


def test_native_options_reach_the_processor_and_the_workers(model, prompts):
    """A token budget and HiPrune's own options, given once in hf_overrides, shape both halves."""
    settings = {"method": "hiprune", "tokens": 20, "alpha": 0.5, "object_layer": 4}
    result = check.compare(model, settings, prompts, max_new_tokens=4)
    assert result.visual_tokens == [20] * PROMPTS and result.ok


def test_without_settings_or_at_keep_one_vllm_answers_as_its_own_model(legacy_model, prompts):
    """The plugin on but not configured, and configured at keep=1.0: the outputs of vLLM without the plugin."""
    stock_tokens, stock_visual, stock_logprobs = stock_vllm(legacy_model, prompts, 6)
    assert stock_visual == [196] * PROMPTS
    for settings in (None, {"method": "hiprune", "keep": 1.0}):
        tokens, visual, logprobs = check.greedy(check.engine(legacy_model, settings), prompts, 6)
        assert visual == stock_visual and tokens == stock_tokens and logprobs == stock_logprobs, settings


def test_settings_are_checked_before_any_model_is_built():
    class Config:
        pass

    config = Config()
    assert selector_from(config) is None
    config.tokenprune = {"keep": 0.5}
    assert selector_from(config).name == "hiprune" and selector_from(config).keep == 0.5
    config.tokenprune = {"method": "tome", "keep": 0.5}
    with pytest.raises(ValueError, match="visual-token selectors"):
        selector_from(config)
    config.tokenprune = 0.5
    with pytest.raises(ValueError, match="must be a dict"):
        selector_from(config)
    config.tokenprune = {"method": "hiprune", "keep": 0.5, "colour": 1}
    with pytest.raises(TypeError, match="unknown option"):
        selector_from(config)


def test_both_checkpoint_layouts_load():
    """transformers 5 saves the tower without "vision_model."; transformers 4 with it: both map to vLLM's CLIP."""
    from tokenprune.vllm.llava import TokenpruneLlava

    mapper = TokenpruneLlava.hf_to_vllm_mapper
    for key in ("vision_tower.embeddings.patch_embedding.weight",
                "vision_tower.vision_model.embeddings.patch_embedding.weight",
                "model.vision_tower.embeddings.patch_embedding.weight"):
        assert mapper.map_name(key) == "vision_tower.vision_model.embeddings.patch_embedding.weight", key
    assert mapper.map_name("model.language_model.layers.0.mlp.up_proj.weight") == (
        "language_model.model.layers.0.mlp.up_proj.weight")


def test_throughput_times_both_engines_on_the_same_requests(model, prompts):
    """The throughput report: both engines time the same requests; the pruned prompts are shorter by exactly
    the dropped visual tokens (196 - 65 per image)."""
    report = check.throughput(model, {"method": "hiprune", "keep": 1 / 3}, prompts[:3], max_new_tokens=2, repeats=1)
    tokens = report["prompt_tokens_per_request"]
    assert tokens["unpruned"] - tokens["pruned"] == 196 - 65
    assert set(report["requests_per_s"]) == {"unpruned", "pruned"} and all(
        r > 0 for r in report["requests_per_s"].values())
    assert report["speedup"] == report["requests_per_s"]["pruned"] / report["requests_per_s"]["unpruned"]


def test_what_cannot_be_served_right_is_refused():
    from types import SimpleNamespace

    from tokenprune.vllm.llava import refuse_unservable

    def config(tower="clip_vision_model", strategy="default", layer=-2):
        return SimpleNamespace(vision_config=SimpleNamespace(model_type=tower, num_hidden_layers=24),
                               vision_feature_select_strategy=strategy, vision_feature_layer=layer)

    def engine(tp=1, pp=1):
        return SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp))

    refuse_unservable(config(), engine())
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        refuse_unservable(config(), engine(tp=2))
    with pytest.raises(ValueError, match="pipeline_parallel_size=1"):
        refuse_unservable(config(), engine(pp=2))
    for tower in ("siglip_vision_model", "blip_vision_model"):  # names either side of CLIP's
        with pytest.raises(ValueError, match=f"CLIP vision tower.*{tower}"):
            refuse_unservable(config(tower), engine())
    for strategy in ("full", "cls"):
        with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
            refuse_unservable(config(strategy=strategy), engine())
    # several feature layers (concatenated): tokenprune.apply refuses them in transformers, so here too
    with pytest.raises(ValueError, match=r"one vision_feature_layer \(an int\), as LLaVA-1.5; got \[-2, -5\]"):
        refuse_unservable(config(layer=[-2, -5]), engine())


@pytest.mark.parametrize("value, registers", [("0", False), ("off", False), (" False", False), ("no", False),
                                              ("1", True), ("", True)])
def test_tokenprune_vllm_off_keeps_the_plugin_from_registering(monkeypatch, value, registers):
    import vllm

    import tokenprune.vllm

    registered = []
    monkeypatch.setattr(vllm.ModelRegistry, "register_model", lambda name, target: registered.append(name))
    monkeypatch.setenv("TOKENPRUNE_VLLM", value)
    tokenprune.vllm.register()
    assert registered == (list(tokenprune.vllm.ARCHITECTURES) if registers else [])


def test_settings_for_an_architecture_the_plugin_does_not_serve_are_refused(monkeypatch):
    """vLLM's architecture lookup, as register() leaves it: the settings pass where vLLM serves one of our
    architectures, and are refused (not ignored) where it resolves another; without settings nothing changes."""
    from types import SimpleNamespace

    import vllm
    from transformers import LlavaConfig, Qwen2_5_VLConfig

    import tokenprune.vllm

    monkeypatch.setattr(vllm.ModelRegistry, "register_model", lambda name, target: None)
    def vllms_lookup(architectures, config):
        return "info", architectures[0]

    monkeypatch.setattr(vllm.ModelRegistry, "inspect_model_cls", vllms_lookup)
    tokenprune.vllm.register()
    tokenprune.vllm.register()  # vLLM loads its plugins in every process, and may call this twice: wrapped once
    lookup = vllm.ModelRegistry.inspect_model_cls
    assert lookup.__wrapped__ is vllms_lookup
    settings = SimpleNamespace(hf_config=LlavaConfig(tokenprune={"method": "hiprune", "keep": 0.5}))
    assert lookup(["LlavaForConditionalGeneration"], settings) == ("info", "LlavaForConditionalGeneration")
    settings.hf_config = Qwen2_5_VLConfig(tokenprune={"method": "hiprune", "keep": 0.5})
    assert lookup(["Qwen2_5_VLForConditionalGeneration"], settings) == ("info", "Qwen2_5_VLForConditionalGeneration")
    with pytest.raises(ValueError, match=r"serves this model as LlavaNextForConditionalGeneration, which the plugin "
                                         r"does not prune .* it would answer unpruned"):
        lookup(["LlavaNextForConditionalGeneration"], settings)
    assert lookup(["LlavaNextForConditionalGeneration"], SimpleNamespace(hf_config=SimpleNamespace())) == (
        "info", "LlavaNextForConditionalGeneration")


def test_a_model_config_that_would_ignore_the_settings_is_refused(model):
    """The real ModelConfig: LLaVA through vLLM's own implementation takes the settings; through the transformers
    backend (``model_impl="transformers"``, another architecture, not ours) it is refused before any weight loads."""
    from vllm.config import ModelConfig

    import tokenprune.vllm

    tokenprune.vllm.register()
    overrides = {"tokenprune": {"method": "hiprune", "keep": 0.5}}
    assert ModelConfig(model=str(model), hf_overrides=overrides).architecture == "LlavaForConditionalGeneration"
    with pytest.raises(ValueError, match="which the plugin does not prune"):
        ModelConfig(model=str(model), hf_overrides=overrides, model_impl="transformers")
    assert ModelConfig(model=str(model), model_impl="transformers").architecture != "LlavaForConditionalGeneration"


def test_the_towers_are_vllms_and_the_settings_are_checked_against_them_in_the_api_process(monkeypatch):
    """The towers as vLLM builds them, from the config alone: LLaVA's up to its feature layer (-2 of 24: 23 layers,
    one unbuilt; a positive index counts the layers), Qwen2.5-VL's every block with its full-attention ones. The
    lookup vLLM calls in the API process refuses an object layer outside the built layers, or a windowed one, with
    the reason (a worker's refusal would reach the caller as "Engine core initialization failed")."""
    import vllm
    from transformers import LlavaConfig, Qwen2_5_VLConfig

    import tokenprune.vllm
    from tokenprune.vllm.towers import TOWERS, built_as_expected, llava_tower, qwen_tower

    assert set(TOWERS) == set(tokenprune.vllm.ARCHITECTURES)
    tower = llava_tower(LlavaConfig())
    assert (tower.depth, tower.output_layer, tower.unbuilt_layers, tower.object_layer) == (23, 22, 1, 9)
    tower = llava_tower(LlavaConfig(vision_feature_layer=5))
    assert (tower.depth, tower.output_layer, tower.unbuilt_layers) == (5, 4, 19)
    assert [llava_tower(LlavaConfig(vision_feature_layer=i)).depth for i in (-1, 0, -24)] == [24, 0, 1]
    built_as_expected(llava_tower(LlavaConfig()), 23)  # what the workers check against the layers vLLM built
    for built in (22, 24):
        with pytest.raises(RuntimeError, match=f"vLLM built {built} layers of LLaVA's vision tower where the plugin "
                                               "expects 23"):
            built_as_expected(llava_tower(LlavaConfig()), built)
    tower = qwen_tower(Qwen2_5_VLConfig())
    assert (tower.depth, tower.output_layer, tower.full_attention_layers, tower.object_layer) == (
        32, 31, (7, 15, 23, 31), 16)

    monkeypatch.setattr(vllm.ModelRegistry, "register_model", lambda name, target: None)
    monkeypatch.setattr(vllm.ModelRegistry, "inspect_model_cls", lambda names, config: ("info", names[0]))
    tokenprune.vllm.register()
    lookup = vllm.ModelRegistry.inspect_model_cls

    def model_config(hf_config):
        return type("ModelConfig", (), {"hf_config": hf_config})()

    llava = LlavaConfig(tokenprune={"method": "hiprune", "keep": 0.5, "object_layer": 23})
    assert lookup(["LlavaForConditionalGeneration"], model_config(llava))[1] == "LlavaForConditionalGeneration"
    llava.tokenprune["object_layer"] = 24
    with pytest.raises(ValueError, match=r"object_layer=24 is outside the 23-layer vision tower of LLaVA \(1-based\); "
                                         r"the 1 layer\(s\) after the one whose features the language model receives "
                                         r"are not built here"):
        lookup(["LlavaForConditionalGeneration"], model_config(llava))
    llava.tokenprune = {"method": "hiprune", "keep": 0.5, "colour": 1}
    with pytest.raises(TypeError, match="unknown option"):
        lookup(["LlavaForConditionalGeneration"], model_config(llava))
    qwen = Qwen2_5_VLConfig(tokenprune={"method": "hiprune", "keep": 0.5, "object_layer": 2})
    with pytest.raises(ValueError, match="object_layer=2 of Qwen2.5-VL attends within windows"):
        lookup(["Qwen2_5_VLForConditionalGeneration"], model_config(qwen))
    qwen.tokenprune["object_layer"] = 8
    assert lookup(["Qwen2_5_VLForConditionalGeneration"], model_config(qwen))[1] == "Qwen2_5_VLForConditionalGeneration"


def test_a_model_config_with_an_object_layer_vllm_does_not_build_is_refused(model):
    """The real ModelConfig on the testbed (a 12-layer CLIP tower, features of layer -2: vLLM builds 11): refused
    at the config, with the reason, before any engine starts."""
    from vllm.config import ModelConfig

    import tokenprune.vllm

    tokenprune.vllm.register()
    settings = {"method": "hiprune", "keep": 1 / 3, "object_layer": 12}
    with pytest.raises(ValueError, match=r"outside the 11-layer vision tower of LLaVA .* not built here"):
        ModelConfig(model=str(model), hf_overrides={"tokenprune": settings})
    settings["object_layer"] = 11
    ModelConfig(model=str(model), hf_overrides={"tokenprune": settings})


def test_the_check_gives_an_object_layer_only_to_a_method_that_takes_one():
    """`python -m tokenprune.vllm.check --family qwen --method random-select` failed on an object_layer it was
    always given (random-select has none)."""
    assert check.settings_of("hiprune", 0.5, None, random_qwen=True) == dict(method="hiprune", keep=0.5,
                                                                           object_layer=2)
    assert check.settings_of("random-select", 0.5, None, random_qwen=True) == dict(method="random-select", keep=0.5)
    assert check.settings_of("hiprune", 0.5, None, random_qwen=False) == dict(method="hiprune", keep=0.5)
    assert check.settings_of("hiprune", 0.5, 3, random_qwen=False) == dict(method="hiprune", keep=0.5, object_layer=3)
    assert check.settings_of("hiprune", 0.5, 1, random_qwen=True)["object_layer"] == 1
