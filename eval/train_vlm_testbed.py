"""Train the VLM testbed (``tokenprune.vlm_testbed``): a LLaVA-1.5-architecture model answering questions about
2x2 Fashion-MNIST mosaics (what is at a cell, whether a class appears, how many of a class), on CPU.

Usage::

    python -m tokenprune.eval.train_vlm_testbed --data-root FASHION_MNIST_FOLDER --steps 3000 --seed 0
    # -> tokenprune/weights/vlm_testbed_fmnist/ (config, safetensors, tokenizer, processor, training record)

Design notes:

* Everything trains from random init, end to end (tower, projector, language model), on mosaics composed
  afresh from the held-in garments (the first 55,000 train images); the validation questions come from the
  last 5,000, the test questions from the test split, so no evaluated garment was seen in training.
* Each training sequence is a conversation of ``--turns`` questions about one mosaic, in the format the
  processor's chat template writes ("USER: <image>\\n{question}{post prompt} ASSISTANT: {answer}</s>USER: ...");
  the loss is on the answers and their ``</s>`` only. The first turn is exactly the prompt ``tokenprune
  eval-vlm`` builds, so the evaluation asks what the model was trained on. Several questions per image
  share the tower's cost.
* Pixels are the processor's (``x / 255`` normalised with mean and std 0.5 on three equal channels: equal to
  ``processor(images=...)`` for a 56x56 mosaic; a test checks it); token ids are the tokenizer's.
* bf16 autocast, adaptive threads, atomic checkpoints every ``--ckpt-minutes`` and at the end, resumable
  (the batches of step ``s`` come from a generator seeded with ``(seed, s)``): as ``train_testbed``.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenprune import vlm_testbed as vt
from tokenprune.testbed import testbed_split

from .train_testbed import ThreadGovernor, atomic_torch_save, fmt_time, log, lr_at


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="folder with the Fashion-MNIST train-*-ubyte.gz files")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32, help="mosaics per step")
    p.add_argument("--turns", type=int, default=4, help="questions per mosaic in one training conversation")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=2e-5)
    p.add_argument("--warmup-steps", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--cell-loss", type=float, default=1.0,
                   help="weight of the auxiliary loss: each cell's class from the visual tokens (0: none)")
    p.add_argument("--token-loss", type=float, default=1.0,
                   help="weight of the auxiliary loss on each visual token: its cell's class, by the same head (0: "
                        "none; runs before 2026-12-02 had none)")
    p.add_argument("--place-loss", type=float, default=1.0,
                   help="weight of the auxiliary loss on each visual token: which cell it lies in, by a linear head "
                        "(0: none; runs before 2026-12-02 had none). Meant to give a cell's tokens a common key "
                        "(docs/testbeds.md: decodable is not yet strong enough)")
    p.add_argument("--code-loss", type=float, default=0.0,
                   help="weight of the auxiliary loss that writes a strong code of each token's cell into the "
                        "projected features: their components along four fixed orthonormal directions are pulled to "
                        "--code-scale for the token's own cell and 0 for the others (0: none)")
    p.add_argument("--code-scale", type=float, default=300.0,
                   help="the code's length; the probe (docs/results/vlm_testbed/lm_probe.py) learnt positions once the "
                        "code was about 3x the length of the rest of the token")
    p.add_argument("--answer-loss", type=float, default=1.0,
                   help="weight of the loss on the answers (0: the language model is not run at all; the tower and the "
                        "projector train on the auxiliary losses only, and validation reports their cell accuracy)")
    p.add_argument("--kinds", nargs="+", choices=vt.KINDS, default=list(vt.TESTBED_KINDS),
                   help="kinds of questions to train and validate on")
    p.add_argument("--init-modules", nargs="+", default=None,
                   help="with --init-from: load only the model's tensors whose names contain one of these (e.g. "
                        "vision_tower multi_modal_projector); the rest starts from random init")
    p.add_argument("--freeze-tower", action="store_true",
                   help="train the projector and the language model only, the vision tower as loaded (--init-from)")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="stop at this step of the --steps schedule (checkpoint and export as at the end): a stage of a "
                        "recipe that continues from a mid-schedule checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", default=None,
                   help="a checkpoint of an earlier run (its last.pt): every tensor whose name and shape match starts "
                        "from it (the tower, the projector, the cell head, matching language-model layers); the "
                        "rest starts from random init; the optimizer starts afresh")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-adaptive-threads", action="store_true")
    p.add_argument("--eval-every", type=int, default=250, help="steps between validation checks")
    p.add_argument("--val-questions", type=int, default=600)
    p.add_argument("--ckpt", default=f"runs/{vt.VLM_TESTBED}/last.pt")
    p.add_argument("--ckpt-minutes", type=float, default=10.0)
    p.add_argument("--out", default=str(vt.vlm_testbed_path()), help="where the trained model folder goes")
    return p.parse_args(argv)


class Conversations:
    """Token ids and labels of training conversations, built from the tokenizer's own ids."""

    def __init__(self, tokenizer, visual_tokens: int) -> None:
        self.tokenizer, self.visual_tokens = tokenizer, visual_tokens

    def ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        out = []
        for i in ids:  # the processor's expansion: one placeholder per visual token
            out += [vt.IMAGE] * self.visual_tokens if i == vt.IMAGE else [i]
        return out

    def encode(self, turns: list[tuple[str, str, str]]) -> tuple[list[int], list[int]]:
        ids, labels = [], []
        for t, (_, question, answer) in enumerate(turns):
            prompt = self.ids(("USER: <image>\n" if t == 0 else "USER: ") + question + vt.POST_PROMPT + " ASSISTANT:")
            reply = self.ids(" " + answer) + [vt.EOS]
            ids += prompt + reply
            labels += [-100] * len(prompt) + reply
        return ids, labels

    def batch(self, conversations: list[tuple[list[int], list[int]]]) -> dict:
        length = max(len(ids) for ids, _ in conversations)
        ids = torch.full((len(conversations), length), vt.PAD)
        labels = torch.full((len(conversations), length), -100)
        mask = torch.zeros(len(conversations), length, dtype=torch.long)
        for row, (i, lab) in enumerate(conversations):  # right padding: training needs no generation
            ids[row, :len(i)], labels[row, :len(lab)], mask[row, :len(i)] = torch.tensor(i), torch.tensor(lab), 1
        return dict(input_ids=ids, labels=labels, attention_mask=mask)


def pixels(canvas: torch.Tensor) -> torch.Tensor:
    """uint8 ``[n, 56, 56]`` mosaics as the processor gives them: ``[n, 3, 56, 56]``, (x / 255 - 0.5) / 0.5."""
    return ((canvas.float() / 255 - 0.5) / 0.5)[:, None].expand(-1, 3, -1, -1).contiguous()


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def training_batch(images, labels, conv: Conversations, args, step: int) -> dict:
    gen = step_generator(args.seed, step)
    canvas, classes = vt.compose_mosaics(images, labels, args.batch_size, gen, flip=True)
    kinds = tuple(args.kinds)
    conversations = [conv.encode([vt.ask(classes[i], gen, kinds=kinds) for _ in range(args.turns)])
                     for i in range(len(classes))]
    return dict(pixel_values=pixels(canvas), cells=classes, **conv.batch(conversations))


def cell_logits(features: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
    """``(B, 4, 10)`` class logits of each mosaic cell from the mean of its 7x7 visual tokens (the projected
    features the language model receives, ``(B, 196, D)`` in raster order)."""
    side = vt.IMAGE_SIZE // vt.PATCH_SIZE
    grid = features.view(features.shape[0], 2, side // 2, 2, side // 2, features.shape[-1])
    return head(grid.mean(dim=(2, 4)).flatten(1, 2))


def token_cells(cells: torch.Tensor) -> torch.Tensor:
    """``(B, 196)``: the class of the cell each visual token lies in (raster order), from ``(B, 4)`` cell classes."""
    side = vt.IMAGE_SIZE // vt.PATCH_SIZE
    half = torch.arange(side) // (side // 2)  # 0 in the top (left) half, 1 in the bottom (right) one
    return cells[:, (2 * half[:, None] + half[None, :]).flatten()]


def token_places(batch: int) -> torch.Tensor:
    """``(batch, 196)``: the cell (0-3, raster order) each visual token lies in."""
    return token_cells(torch.arange(len(vt.CELLS)).expand(batch, -1))


@functools.lru_cache(maxsize=None)  # the same directions every step: one QR per width, not one per step
def cell_code_directions(dim: int) -> torch.Tensor:
    """``(4, dim)``: fixed orthonormal directions, one per mosaic cell, along which the code loss writes the cell
    code (seeded, so a resumed or warm-started run pulls towards the same code)."""
    gen = torch.Generator().manual_seed(vt.VLM_EVAL_SEED)
    q, _ = torch.linalg.qr(torch.randn(dim, len(vt.CELLS), generator=gen))
    return q.T.contiguous()


def code_loss(features: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean squared distance, in units of ``scale``, between each token's components along the cell-code
    directions and ``scale`` times the one-hot of its own cell."""
    components = features.float() @ cell_code_directions(features.shape[-1]).T / scale
    target = F.one_hot(token_places(len(features)), len(vt.CELLS)).float()
    return F.mse_loss(components, target)


def auxiliary_loss(features: torch.Tensor, head: torch.nn.Module, cells: torch.Tensor, cell_weight: float,
                   token_weight: float, place_head: torch.nn.Module | None = None,
                   place_weight: float = 0.0, code_weight: float = 0.0, code_scale: float = 1.0) -> torch.Tensor:
    """The auxiliary losses on the projected visual features ``(B, 196, D)``: each cell's class from the mean of
    its tokens and each token's cell class from the token itself, by one head; each token's cell, by
    ``place_head``; the cell code (``code_loss``)."""
    loss = cell_weight * F.cross_entropy(cell_logits(features, head).float().flatten(0, 1), cells.flatten())
    if token_weight:
        loss = loss + token_weight * F.cross_entropy(head(features).float().flatten(0, 1),
                                                     token_cells(cells).flatten())
    if place_weight:
        loss = loss + place_weight * F.cross_entropy(place_head(features).float().flatten(0, 1),
                                                     token_places(len(features)).flatten())
    if code_weight:
        loss = loss + code_weight * code_loss(features, code_scale)
    return loss


class ClassWordHead(torch.nn.Module):
    """Class logits of visual features as their dot product with the language model's own input embeddings of
    the ten class words (plus a bias). Trained through it, a visual token of a coat comes to look like the
    word "coat" to the language model, as LLaVA's projector maps into the word-embedding space, so that "is
    there a coat ?" becomes a match between a word and tokens like it. (With a separate linear head presence
    stayed at chance in 3,000 steps; with this one too, in 575 more: docs/testbeds.md.)"""

    def __init__(self, embeddings: torch.nn.Embedding, word_ids: list[int]) -> None:
        super().__init__()
        self.embeddings = [embeddings]  # a list, not a submodule: the weight is the model's, saved with it
        self.register_buffer("word_ids", torch.tensor(word_ids), persistent=False)
        self.bias = torch.nn.Parameter(torch.zeros(len(word_ids)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        words = self.embeddings[0].weight[self.word_ids]
        return features @ words.to(features.dtype).T + self.bias.to(features.dtype)


def class_word_head(model, tokenizer) -> ClassWordHead:
    return ClassWordHead(model.get_input_embeddings(), tokenizer.convert_tokens_to_ids(list(vt.CLASS_WORDS)))


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """``(B, 196, D)``: the projected visual features the language model receives."""
    return torch.stack(model.model.get_image_features(pixel_values=pixel_values).pooler_output)


def forward_with_cells(model, batch):
    """The VLM's logits and the projected image features from one pass of the tower: the features are computed
    once and scattered into the placeholders (what the model's own forward does with ``pixel_values``)."""
    features = image_features(model, batch["pixel_values"])
    embeds = model.get_input_embeddings()(batch["input_ids"])
    mask = (batch["input_ids"] == vt.IMAGE)[..., None]
    embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
    logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    return logits, features


@torch.no_grad()
def answer_accuracy(model, conv: Conversations, canvas, classes, kinds, dtype) -> dict[str, float]:
    """Accuracy (%) of the first answer token, teacher-forced on single-turn prompts (what eval-vlm asks; every
    answer here is one word), overall and per kind of question."""
    model.eval()
    gen = torch.Generator().manual_seed(vt.VLM_EVAL_SEED)
    right = {k: [] for k in kinds}
    for start in range(0, len(canvas), 50):
        rows = range(start, min(start + 50, len(canvas)))
        turns = [vt.ask(classes[i], gen, kinds[i]) for i in rows]
        encoded = [conv.encode([t]) for t in turns]
        batch = conv.batch(encoded)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            logits = model(pixel_values=pixels(canvas[list(rows)]), input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
        for row, (ids, lab) in enumerate(encoded):
            first = next(i for i, v in enumerate(lab) if v != -100)  # the answer's first token
            right[turns[row][0]].append(int(logits[row, first - 1].argmax()) == lab[first])
    model.train()
    total = [r for rs in right.values() for r in rs]
    return {"all": 100 * sum(total) / len(total), **{k: 100 * sum(v) / max(1, len(v)) for k, v in right.items()}}


@torch.no_grad()
def cell_accuracy(model, head, canvas, classes, dtype) -> float:
    """Accuracy (%) of each mosaic cell's class from the mean of its tokens' projected features, by ``head``: what
    the visual tokens tell of a cell, the ceiling of the position questions."""
    model.eval()
    right = []
    for start in range(0, len(canvas), 50):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            logits = cell_logits(image_features(model, pixels(canvas[start:start + 50])), head)
        right.append(logits.argmax(-1) == classes[start:start + 50])
    model.train()
    return 100 * torch.cat(right).float().mean().item()


def load_matching(module: torch.nn.Module, saved: dict, wanted=lambda name: True) -> tuple[dict, list[str]]:
    """Load the tensors of ``saved`` whose name and shape match ``module``'s (and that ``wanted`` accepts);
    ``strict=False`` alone would still fail on a changed shape. Returns what was loaded and the names left fresh."""
    own = module.state_dict()
    match = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape and wanted(k)}
    module.load_state_dict(match, strict=False)
    return match, [k for k in own if k not in match]


def warm_start(model, cell_head, path, modules: list[str] | None = None) -> dict:
    """Load every tensor of an earlier run's checkpoint whose name and shape match (only those of ``modules``
    for the model, where given); the record says what was loaded and what starts fresh. A fresh language-model
    layer stacked on loaded ones gets zero output projections (attention ``o_proj``, MLP ``down_proj``): it
    starts as the identity on the residual stream, so the warm-started model first answers as the earlier one
    did, and the new layer grows from there instead of adding noise."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    loaded, fresh = load_matching(model, state["model"],
                                  lambda name: modules is None or any(m in name for m in modules))
    head_loaded, head_fresh = load_matching(cell_head, state["cell_head"])
    if any("language_model.layers." in k for k in loaded):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in fresh and name.endswith(("o_proj.weight", "down_proj.weight")):
                    param.zero_()
    return dict(loaded=len(loaded) + len(head_loaded), fresh=fresh + head_fresh, from_step=state["step"],
                from_history=json.loads(state["history"]))


def export(model, processor, out: Path, record: dict) -> None:
    """The model folder (config, safetensors, generation config, tokenizer, processor) and the training record,
    written to a sibling folder first and swapped in, so a killed export leaves the previous one whole."""
    import shutil

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    for f in tmp.iterdir():
        f.chmod(0o644)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def training_command(args) -> str:
    """The command that reproduces the training, every setting that shapes it spelled out (no local paths)."""
    def setting(name):
        flag, v = "--" + name.replace("_", "-"), getattr(args, name)
        if isinstance(v, bool):  # a switch: named when on
            return flag if v else ""
        if v is None:  # an option left unset
            return ""
        return f"{flag} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"

    settings = " ".join(filter(None, map(setting, TRAINING_SETTINGS)))
    init = f" --init-from {args.init_from}" if args.init_from else ""
    init += f" --init-modules {' '.join(args.init_modules)}" if args.init_from and args.init_modules else ""
    return f"python -m tokenprune.eval.train_vlm_testbed --data-root FASHION_MNIST_FOLDER {settings}{init}"


TRAINING_SETTINGS = ("steps", "batch_size", "turns", "lr", "min_lr", "warmup_steps", "weight_decay", "cell_loss",
                     "token_loss", "place_loss", "code_loss", "code_scale", "answer_loss", "kinds", "freeze_tower",
                     "stop_after", "seed", "precision")


def main(argv=None):
    from transformers import LlavaForConditionalGeneration

    args = parse_args(argv)
    governor = ThreadGovernor(args.threads, not args.no_adaptive_threads)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    images, labels = testbed_split("fmnist", "train", args.data_root)
    val_images, val_labels = testbed_split("fmnist", "val", args.data_root)
    val_gen = torch.Generator().manual_seed(vt.VLM_EVAL_SEED)
    val_canvas, val_classes = vt.compose_mosaics(val_images, val_labels, args.val_questions, val_gen)
    val_kinds = [args.kinds[i % len(args.kinds)] for i in range(args.val_questions)]

    processor = vt.vlm_testbed_processor()
    config = vt.vlm_testbed_config()
    conv = Conversations(processor.tokenizer, (vt.IMAGE_SIZE // vt.PATCH_SIZE) ** 2)
    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration(config).train()
    # the auxiliary head (its bias is not exported; its weights are the model's class-word embeddings): each cell's
    # and each token's class from the features the language model receives, so the tower learns what garments are
    # from a direct signal, in the language model's own words
    cell_head = class_word_head(model, processor.tokenizer)
    place_head = torch.nn.Linear(config.text_config.hidden_size, len(vt.CELLS))  # not exported either
    if args.freeze_tower:
        model.model.vision_tower.requires_grad_(False)
    named = [*model.named_parameters(), *(("cell_head." + n, p) for n, p in cell_head.named_parameters()),
             *(("place_head." + n, p) for n, p in place_head.named_parameters())]
    named = [(n, p) for n, p in named if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    ckpt = Path(args.ckpt)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    step, history, elapsed_before = 0, [], 0.0
    init_record = None
    if args.init_from and not ckpt.exists():
        init_record = warm_start(model, cell_head, args.init_from, args.init_modules)
        log(f"warm start from {args.init_from}: {init_record['loaded']} tensors loaded, "
            f"{len(init_record['fresh'])} fresh ({', '.join(init_record['fresh'][:4])}...)")
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        cell_head.load_state_dict(state["cell_head"])
        place_head.load_state_dict(state["place_head"])
        optimizer.load_state_dict(state["optimizer"])
        step, history, elapsed_before = state["step"], json.loads(state["history"]), state["elapsed"]
        init_record = json.loads(state.get("init_from", "null"))
        log(f"resumed at step {step}")
    params = sum(p.numel() for p in model.parameters())
    log(f"{vt.VLM_TESTBED}: {params / 1e6:.2f}M params | {args.steps} steps x {args.batch_size} mosaics x "
        f"{args.turns} questions | {args.precision} | torch {torch.__version__}")

    def save():
        atomic_torch_save(dict(model=model.state_dict(), cell_head=cell_head.state_dict(),
                               place_head=place_head.state_dict(),
                               optimizer=optimizer.state_dict(), step=step,
                               history=json.dumps(history), init_from=json.dumps(init_record),
                               elapsed=elapsed_before + time.time() - start), ckpt)

    start, last_ckpt, losses, first_step = time.time(), time.time(), [], step
    last_log = start
    last = args.steps if args.stop_after is None else min(args.stop_after, args.steps)
    while step < last:
        batch = training_batch(images, labels, conv, args, step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            if args.answer_loss:
                logits, features = forward_with_cells(model, batch)
            else:
                features = image_features(model, batch["pixel_values"])
            loss = auxiliary_loss(features, cell_head, batch["cells"], args.cell_loss, args.token_loss,
                                  place_head, args.place_loss, args.code_loss, args.code_scale)
        if args.answer_loss:  # each position predicts the next token; only the answers (and their </s>) carry labels
            loss = loss + args.answer_loss * F.cross_entropy(logits[:, :-1].float().flatten(0, 1),
                                                             batch["labels"][:, 1:].flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        governor.step()
        step += 1
        losses.append(loss.item())
        if step % 25 == 0:
            now = time.time()
            spent = elapsed_before + now - start
            lr = lr_at(step, args.steps, args)
            log(f"step {step}/{args.steps} loss {sum(losses) / len(losses):.4f} lr {lr:.2e} | "
                f"{args.batch_size * len(losses) / (now - last_log):.1f} mosaics/s {governor.threads}T | "
                f"elapsed {fmt_time(spent)} ETA {fmt_time((last - step) * (now - start) / (step - first_step))}")
            last_log, losses = now, []
        if step % args.eval_every == 0 or step == last:
            cells = cell_accuracy(model, cell_head, val_canvas, val_classes, dtype)
            if args.answer_loss:
                accuracy = answer_accuracy(model, conv, val_canvas, val_classes, val_kinds, dtype)
                kinds = ", ".join(f"{k} {v:.1f}" for k, v in accuracy.items() if k != "all")
                log(f"val answer accuracy {accuracy['all']:.2f} ({kinds}) | cell accuracy {cells:.1f}")
            else:
                accuracy = {}
                log(f"val cell accuracy {cells:.1f}")
            history.append(dict(step=step, val=accuracy, cell=cells))
        if time.time() - last_ckpt > 60 * args.ckpt_minutes or step == last:
            save()
            last_ckpt = time.time()
            log(f"checkpoint -> {ckpt}")
    model.eval()
    record = dict(model=vt.VLM_TESTBED, steps=args.steps, steps_done=step, batch_size=args.batch_size, turns=args.turns,
                  seed=args.seed, lr=args.lr, precision=args.precision, params=params,
                  train_seconds=round(elapsed_before + time.time() - start), history=history,
                  training_command=training_command(args), init_from=init_record,
                  torch=torch.__version__)
    export(model, processor, Path(args.out), record)
    log(f"model folder -> {args.out}")


if __name__ == "__main__":
    main()
