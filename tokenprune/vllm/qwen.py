"""Qwen2.5-VL in vLLM with its visual tokens selected (``tokenprune.vllm``).

As for LLaVA (``llava.py``), the processor writes ``budget(N)`` placeholders per image and the model returns the
selected features of each image, in raster order, scored by pre-hooks on its tower's attention (two
full-attention blocks; the windowed blocks run in window order, which the scores are read back from).

What Qwen adds is its M-RoPE positions: a kept visual token keeps its original (t, row, column) position, and the
text after an image starts where it would without pruning, as tokenprune's transformers adapter does
(``positions="original"``, Qwen's only mode). vLLM computes a request's positions from its placeholders when the
request arrives, before the tower has chosen anything, so the positions are fixed in two steps inside the model:

* ``get_mrope_input_positions`` gives a selected image's K placeholders the image's base position on all three
  axes and starts the text after it at ``base + max(rows, columns)``, as the unpruned image would;
* each selected feature carries its (row, column) in two extra channels, which travel with it through vLLM's
  encoder cache and chunked prefill; ``embed_input_ids`` takes them off and ``forward`` adds them to the step's
  positions. Unconsumed offsets raise rather than shift the next step.
"""
from __future__ import annotations

import numpy as np
import torch
from vllm.model_executor.layers.fusion.mm_input_norm import IdentityInputNorm
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from .selection import AttentionScores, refuse_parallelism, select_exactly, selector_from
from .towers import built_as_expected, qwen_tower

#: the channels a selected feature carries after its embedding: its row and column on the image's token grid
OFFSET_CHANNELS = 2


def _selected(item) -> bool:
    """Whether an image item goes through the tower, hence the selection (precomputed ``image_embeds`` do not:
    they keep every token and their stock positions)."""
    return "pixel_values" in item


class TokenpruneQwenInfo(Qwen2_5_VLProcessingInfo):
    """Qwen2.5-VL's processing info with the pruned maximum per image (it sizes vLLM's encoder budget)."""

    def get_mm_max_tokens_per_item(self, seq_len, mm_counts):
        counts = dict(super().get_mm_max_tokens_per_item(seq_len, mm_counts))
        selector = selector_from(self.get_hf_config())
        if selector is not None:
            counts["image"] = selector.budget(counts["image"])
        return counts


class TokenpruneQwenProcessor(Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor writing ``budget(N)`` placeholders for each image the model will select from."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        selector = selector_from(self.info.get_hf_config())
        if selector is None:
            return updates

        def pruned(item_index: int, stock):
            tokens = stock(item_index)  # N placeholders, N from the item's grid
            if not _selected(out_mm_kwargs["image"][item_index]):
                return tokens
            return tokens[:selector.budget(len(tokens))]

        return [PromptReplacement(modality="image", target=update.target,
                                  replacement=lambda i, stock=update.replacement: pruned(i, stock))
                if update.modality == "image" else update for update in updates]


def refuse_unservable(vllm_config) -> None:
    """Raise ValueError for what the plugin cannot serve right, before any weight is loaded."""
    refuse_parallelism(vllm_config)
    multimodal, compilation = vllm_config.model_config.multimodal_config, vllm_config.compilation_config
    if multimodal is not None and multimodal.mm_encoder_tp_mode == "data":
        raise ValueError("tokenprune needs the vision tower unsharded (mm_encoder_tp_mode='weights')")
    if multimodal is not None and multimodal.is_multimodal_pruning_enabled():
        raise ValueError("tokenprune and vLLM's video pruning (video_pruning_rate > 0) both rewrite Qwen's "
                         "M-RoPE positions: use one of them")
    if compilation.compile_mm_encoder or compilation.cudagraph_mm_encoder:
        raise ValueError("tokenprune reads the vision tower's attention from hooks, which a compiled or "
                         "CUDA-graph encoder (compile_mm_encoder, cudagraph_mm_encoder) bypasses")
    if vllm_config.speculative_config is not None:
        raise ValueError("tokenprune's position offsets reach the target model's forward only: no speculative "
                         "decoding")
    if getattr(compilation.cudagraph_mode, "name", "") == "FULL":
        raise ValueError("tokenprune adds the kept tokens' positions in the model's eager forward, which a FULL "
                         "CUDA graph replays without: use FULL_AND_PIECEWISE or PIECEWISE")


@MULTIMODAL_REGISTRY.register_processor(TokenpruneQwenProcessor, info=TokenpruneQwenInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class TokenpruneQwen25VL(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL; with ``hf_overrides["tokenprune"]`` set, each image's features are the selected ones,
    at their original M-RoPE positions."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenprune_selector = selector = selector_from(self.config)
        self._tokenprune_offsets: tuple[torch.Tensor, torch.Tensor] | None = None
        if selector is None:
            return
        refuse_unservable(vllm_config)
        blocks = self.visual.blocks
        tower = qwen_tower(self.config)
        selector.check(tower)  # refuses a windowed score layer
        built_as_expected(tower, len(blocks))
        self.tokenprune_layers = selector.score_layers(tower)
        self.tokenprune_scores = AttentionScores({i: blocks[i].attn.attn for i in set(self.tokenprune_layers)})

    # ------------------------------------------------------------ the features

    def embed_multimodal(self, **kwargs: object):
        if self.tokenprune_selector is None:
            return super().embed_multimodal(**kwargs)
        embeddings = []
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "image" and inputs["type"] == "pixel_values":
                features, kept = self._tokenprune_select(inputs)
                for image, keep, (_, _, width) in zip(features, kept, self._token_grids(inputs)):
                    keep = keep.to(image.device)
                    embeddings.append(_with_offsets(image[keep], keep // width, keep % width))
            else:  # videos and precomputed embeddings: every token, at its stock position
                stock = (self._process_image_input(inputs) if modality == "image"
                         else self._process_video_input(inputs))
                for e in stock:
                    zeros = e.new_zeros(len(e), dtype=torch.long)
                    embeddings.append(_with_offsets(e, zeros, zeros))
        return tuple(embeddings)

    def tokenprune_kept(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """The indices (raster order of each image's token grid) ``embed_multimodal`` keeps, for
        ``tokenprune.vllm.check`` to compare with the transformers adapter (``LLM.apply_model``).
        ``pixel_values`` as transformers' processor gives them: normalised, so vLLM's own on-device
        normalisation (``mm_device_do_normalize``, on by default for Qwen) is left out of this call."""
        inputs = self._parse_and_validate_image_input(pixel_values=pixel_values.to(self.visual.dtype),
                                                      image_grid_thw=image_grid_thw)
        device_norm, self.visual.input_norm = self.visual.input_norm, IdentityInputNorm()
        try:
            return [keep.cpu() for keep in self._tokenprune_select(inputs)[1]]
        finally:
            self.visual.input_norm = device_norm

    def _token_grids(self, inputs) -> list[tuple[int, int, int]]:
        merge = self.visual.spatial_merge_size
        return [(t, h // merge, w // merge) for t, h, w in inputs["image_grid_thw"].tolist()]

    def _tokenprune_select(self, inputs) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
        selector, merge = self.tokenprune_selector, self.visual.spatial_merge_unit
        patches = inputs["image_grid_thw"].prod(-1).tolist()
        with self.tokenprune_scores.recording(segments=self._tokenprune_segments(inputs, patches)) as scores:
            features = self._process_image_input(inputs)
        kept, start = [], 0
        grids = zip(inputs["image_grid_thw"].tolist(), self._token_grids(inputs))
        for ((t, h, w), (_, rows, cols)), count, image in zip(grids, patches, features):
            window_order = self.visual.get_rope_by_thw(t, h, w)[2]  # token i of the blocks' order is raster token
            layer_scores = []
            for layer in self.tokenprune_layers:
                per_token = scores[layer][0, start:start + count].view(-1, merge).mean(dim=-1)  # 2x2 patches: a token
                raster = torch.empty_like(per_token)
                raster[window_order.to(raster.device)] = per_token
                layer_scores.append(raster)
            kept.append(select_exactly(selector, tuple(layer_scores), (rows, cols), len(image)))
            start += count
        return features, kept

    def _tokenprune_segments(self, inputs, patches: list[int]) -> dict[int, list[int]]:
        """Per score layer, the sequences its attention runs over: each image in a full-attention block, each
        window in a windowed one (a score layer may be windowed: the output layer of a tower whose last block is
        not in ``fullatt_block_indexes``; the transformers adapter scores it per window, as it attends)."""
        windows = []
        for t, h, w in inputs["image_grid_thw"].tolist():
            ends = self.visual.get_rope_by_thw(t, h, w)[3].tolist()  # the image's window ends, in patches
            windows += [end - start for start, end in zip([0, *ends], ends)]
        full = set(self.visual.fullatt_block_indexes)
        return {layer: patches if layer in full else windows for layer in set(self.tokenprune_layers)}

    # ------------------------------------------------------------ the positions

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self.tokenprune_selector is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        parts, start, next_position = [], 0, 0
        for feature, (offset, t, rows, cols, t_factor) in zip(features, self.iter_mm_grid_thw(features)):
            text = offset - start
            parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
            base = next_position + text
            if feature.modality == "image" and _selected(feature.data):
                # provisional: each selected feature adds its (0, row, column) in forward
                parts.append(np.full((3, feature.mm_position.length), base))
                next_position = base + max(rows, cols)  # where the text after the unpruned image starts
            else:
                grid = np.indices((t, rows, cols))
                if t_factor != 1.0:
                    grid[0] = (grid[0] * t_factor).astype(np.int64)
                grid = grid.reshape(3, -1) + base
                parts.append(grid)
                next_position = int(grid.max()) + 1
            start = offset + feature.mm_position.length
        text = len(input_tokens) - start
        parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
        next_position += text
        return torch.from_numpy(np.concatenate(parts, axis=1)), next_position - len(input_tokens)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        if self.tokenprune_selector is None or not multimodal_embeddings:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        if self._tokenprune_offsets is not None:
            raise RuntimeError("tokenprune: the last step's visual-token positions were never applied (a forward "
                               "that did not run this model's Python code, e.g. a replayed CUDA graph)")
        offsets = torch.cat([e[:, -OFFSET_CHANNELS:] for e in multimodal_embeddings]).round().long()
        self._tokenprune_offsets = (is_multimodal, offsets)
        return super().embed_input_ids(input_ids, [e[:, :-OFFSET_CHANNELS] for e in multimodal_embeddings],
                                       is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        pending, self._tokenprune_offsets = self._tokenprune_offsets, None
        if pending is not None:
            # in place: ``positions`` is the runner's buffer, refilled from the request's positions every step
            # (and the address a CUDA graph reads)
            is_multimodal, offsets = pending
            tokens = is_multimodal.nonzero().flatten().to(positions.device)
            positions[1:, tokens] += offsets.T.to(positions.device, positions.dtype)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)


def _with_offsets(features: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``features`` with each row's grid position appended (``OFFSET_CHANNELS`` channels, exact in its dtype)."""
    offsets = torch.stack([rows, cols], dim=1)
    packed = offsets.to(features.dtype)
    if not torch.equal(packed.long(), offsets):
        raise ValueError(f"tokenprune: token-grid positions up to {int(offsets.max())} are not exact in "
                         f"{features.dtype}; serve this image size in float16 or float32")
    return torch.cat([features, packed], dim=1)
