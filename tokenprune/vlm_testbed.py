"""The pieces of a small LLaVA-1.5-architecture model that loads with transformers' own classes: a word-level
tokenizer (``tokenizers``' WordLevel model, saved as ``tokenizer.json``), LLaVA-1.5's conversation format as a
chat template, and a ``LlavaProcessor`` around a CLIP image processor (and a random Qwen2.5-VL with the same
tokenizer, for the tests of the Qwen paths). Nothing here is a new model class:
a folder saved from these loads with ``AutoProcessor`` / ``AutoModelForImageTextToText.from_pretrained``.
"""
from __future__ import annotations

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")  # ids 0..4 in this order
PAD, UNK, BOS, EOS, IMAGE = range(len(SPECIAL_TOKENS))

#: LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT: ...</s>"), images first in a user turn; a
#: message's content is a list of parts (the processor's form) or a plain string (lmms-eval's, "<image>\n..."
#: written by the caller).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %} ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def word_tokenizer(words, named_tokens: dict[str, str] | None = None):
    """A ``PreTrainedTokenizerFast`` whose tokens are ``SPECIAL_TOKENS`` then ``words`` (lower case): text is
    lower-cased and split at spaces and punctuation; an unknown word is ``<unk>``; decoding joins with spaces.
    ``named_tokens`` (default ``{"image_token": "<image>"}``, LLaVA's) are the special tokens a processor finds
    by name (Qwen's: ``image_token``, ``video_token``, ``vision_start_token``, ``vision_end_token``); they are
    added after the words where they are not among them."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    named_tokens = {"image_token": "<image>"} if named_tokens is None else named_tokens
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in [w.lower() for w in words] + list(named_tokens.values()):
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # WordPiece's decoder: tokens joined by spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens=named_tokens, chat_template=CHAT_TEMPLATE)
    added = [token for token in named_tokens.values() if token not in SPECIAL_TOKENS]
    fast.add_special_tokens({"additional_special_tokens": added})
    return fast


def llava_processor(tokenizer, image_size: int, patch_size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """LLaVA-1.5's processor for a CLIP tower of ``image_size`` / ``patch_size``: images resized (shortest edge)
    and centre-cropped to ``image_size``; one ``<image>`` placeholder per patch (the class token dropped, the
    ``default`` feature strategy)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size},
                                image_mean=list(mean), image_std=list(std))
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          num_additional_image_tokens=1)


#: the special tokens Qwen2.5-VL's processor finds by name, and its layout of a user turn (vision markers around
#: the image pad) in LLaVA-1.5's conversation format
QWEN_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
               "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
QWEN_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<image>\n", "<|vision_start|><|image_pad|><|vision_end|>")


def random_qwen25vl(words, patch_size: int = 4, min_pixels: int = 1024, max_pixels: int = 1024, seed: int = 0,
                    attention_sharpness: float = 8.0):
    """A random-init Qwen2.5-VL small enough for the CPU, and its processor (``word_tokenizer(words)``, the
    2x2 merger, images resized to between ``min_pixels`` and ``max_pixels`` in multiples of ``2 * patch_size``;
    the defaults make every image 32x32 px, 16 visual tokens). Four vision blocks (whole-image attention in the
    2nd and 4th, windows of 2x2 visual tokens in the others) and a 2-layer language model with heads of 32,
    the smallest vLLM's CPU attention takes. Returns ``(model, processor)``."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = word_tokenizer(words, QWEN_TOKENS)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in QWEN_TOKENS.items()}
    sizes = dict(patch_size=patch_size, merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, **sizes),
        video_processor=Qwen2VLVideoProcessor(**sizes), tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=4 * patch_size, fullatt_block_indexes=[1, 3], in_channels=3),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}, pad_token_id=PAD,
                         bos_token_id=BOS, eos_token_id=EOS),
        image_token_id=ids["image_token"], video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"], vision_end_token_id=ids["vision_end_token"])
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # attention at init is near uniform: its ranking is rounding noise, and positions
        # barely matter. Sharpened, which tokens a selector keeps is a property of the weights, and a token's
        # position changes what the language model says
        for block in model.model.visual.blocks:
            block.attn.qkv.weight.mul_(attention_sharpness)
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(attention_sharpness)
            layer.self_attn.k_proj.weight.mul_(attention_sharpness)
    return model, processor


# ---------------------------------------------------------------- the trained VLM testbed: questions on mosaics

import torch  # noqa: E402  (the pieces above import lazily; the task below is tensors)

#: Fashion-MNIST's classes as one word each (T-shirt/top -> "tshirt", ankle boot -> "boot"), and their plurals
CLASS_WORDS = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
PLURALS = ("tshirts", "trousers", "pullovers", "dresses", "coats", "sandals", "shirts", "sneakers", "bags", "boots")
CELLS = ("top left", "top right", "bottom left", "bottom right")  # the 2x2 cells in raster order
KINDS = ("position", "presence", "count")
#: the kinds the VLM testbed is trained and evaluated on: what stands at a cell. Presence and counts need the
#: language model to match a class word against the image's tokens, which a 4-layer model trained from scratch
#: did not learn on this machine even from perfect per-token class features (docs/testbeds.md)
TESTBED_KINDS = ("position",)
#: the text after every question: LLaVA-1.5's short-answer prompt, what ``tokenprune eval-vlm`` adds by default
POST_PROMPT = "\nAnswer the question using a single word or phrase."
WORDS = tuple(dict.fromkeys(
    "user assistant : what is at the ? there a how many are answer question using single word or phrase .".split()
    + [w for cell in CELLS for w in cell.split()] + list(CLASS_WORDS) + list(PLURALS)
    + ["yes", "no", "0", "1", "2", "3", "4"]))
IMAGE_SIZE, PATCH_SIZE = 56, 4  # a 2x2 mosaic of 28x28 garments; 14x14 = 196 visual tokens
VLM_TESTBED = "vlm_testbed_fmnist"
VLM_EVAL_SEED = 4321  # the question sets of the val and test splits are drawn once with this seed (+ split)


def vlm_testbed_path():
    """The packaged VLM testbed: a folder ``LlavaForConditionalGeneration.from_pretrained`` and
    ``AutoProcessor.from_pretrained`` load (transformers' own classes, safetensors)."""
    from pathlib import Path

    return Path(__file__).resolve().parent / "weights" / VLM_TESTBED


def vlm_testbed_config():
    """LLaVA-1.5's layout at a CPU size: a 12-layer CLIP tower (56 px, patch 4; features of layer -2, without
    the class token, as LLaVA-1.5), the two-layer GELU projector, and a 4-layer Llama (two layers learnt to
    name what stands at a cell but not to compare a class word with the image: presence stayed at chance)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=64, num_hidden_layers=12, num_attention_heads=2, intermediate_size=256,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3, hidden_act="gelu")
    text = LlamaConfig(vocab_size=len(SPECIAL_TOKENS) + len(WORDS), hidden_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, intermediate_size=384,
                       max_position_embeddings=1024, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                       tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


def vlm_testbed_processor():
    return llava_processor(word_tokenizer(WORDS), IMAGE_SIZE, PATCH_SIZE)


def compose_mosaics(images: torch.Tensor, labels: torch.Tensor, n: int, gen: torch.Generator, flip: bool = False):
    """``n`` 2x2 mosaics of 28x28 garments (uint8 ``[n, 56, 56]``) and the class of each cell (``[n, 4]``,
    raster order). Half the mosaics repeat one class in about half their cells, so counts above one occur."""
    cells = len(CELLS)
    classes = torch.randint(0, 10, (n, cells), generator=gen)
    repeated = torch.randint(0, 10, (n, 1), generator=gen).expand(n, cells)
    repeat = (torch.rand(n, 1, generator=gen) < 0.5) & (torch.rand(n, cells, generator=gen) < 0.5)
    classes = torch.where(repeat, repeated, classes)
    order = torch.argsort(labels, stable=True)  # a random garment of each cell's class
    counts = torch.bincount(labels, minlength=10)
    starts = torch.cumsum(counts, 0) - counts
    pick = (torch.rand(n, cells, generator=gen) * counts[classes]).long()
    tiles = images[order[starts[classes] + pick]]  # [n, 4, 28, 28]
    if flip:
        tiles = torch.where((torch.rand(n, cells, generator=gen) < 0.5)[..., None, None], tiles.flip(-1), tiles)
    side = images.shape[-1]
    canvas = tiles.reshape(n, 2, 2, side, side).permute(0, 1, 3, 2, 4).reshape(n, 2 * side, 2 * side)
    return canvas, classes


def ask(cells: torch.Tensor, gen: torch.Generator, kind: str | None = None,
        kinds: tuple[str, ...] = KINDS) -> tuple[str, str, str]:
    """One question about a mosaic whose cells hold the classes ``cells`` (4 ints): (kind, question, answer), of
    ``kind`` or, where it is None, of a kind drawn from ``kinds``.
    position: the class at a cell; presence: yes or no (even odds); count: how many of a class (a present
    class two times in three)."""
    def draw(k: int) -> int:
        return int(torch.randint(0, k, (1,), generator=gen))

    kind = kind or kinds[draw(len(kinds))]
    present = sorted(set(cells.tolist()))
    absent = [c for c in range(10) if c not in present]
    if kind == "position":
        cell = draw(len(CELLS))
        return kind, f"what is at the {CELLS[cell]} ?", CLASS_WORDS[int(cells[cell])]
    if kind == "presence":
        yes = draw(2) == 1
        c = present[draw(len(present))] if yes else absent[draw(len(absent))]
        return kind, f"is there a {CLASS_WORDS[c]} ?", "yes" if yes else "no"
    if kind == "count":
        c = present[draw(len(present))] if draw(3) < 2 else absent[draw(len(absent))]
        return kind, f"how many {PLURALS[c]} are there ?", str(int((cells == c).sum()))
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def question_set(split: str = "test", n: int = 2000, root=None):
    """A ``datasets.Dataset`` of ``n`` questions (columns image, question, answer, kind; one question per
    mosaic, the kinds in turn) on mosaics of the split's garments, drawn once with a fixed seed: ``test``
    from the packaged Fashion-MNIST test split, ``val`` from the last 5,000 train images (needs the train
    files: ``root`` or ``$TOKENPRUNE_FMNIST_ROOT``)."""
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    from .testbed import testbed_split

    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    images, labels = testbed_split("fmnist", split, root)
    gen = torch.Generator().manual_seed(VLM_EVAL_SEED + ("val", "test").index(split))
    canvas, classes = compose_mosaics(images, labels, n, gen)
    rows = [ask(classes[i], gen, TESTBED_KINDS[i % len(TESTBED_KINDS)]) for i in range(n)]
    return Dataset.from_dict(
        dict(image=[PILImage.fromarray(c.numpy()) for c in canvas], question=[r[1] for r in rows],
             answer=[r[2] for r in rows], kind=[r[0] for r in rows]),
        features=Features(image=Image(), question=Value("string"), answer=Value("string"), kind=Value("string")))
