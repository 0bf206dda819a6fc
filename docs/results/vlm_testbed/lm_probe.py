"""Can the VLM testbed's language model learn to read the image at all? A probe that takes the vision tower out
of the question: the visual tokens are *perfect* features (a learned embedding of the class of the cell each
token lies in, plus a learned per-token position vector, plus optionally a learned code of the cell itself,
scaled by ``cell_code``), and the testbed's 4-layer Llama (random init) is trained on the testbed's
conversations (4 questions per mosaic, all three kinds) for a few hundred steps. First-turn accuracy per kind
on fresh mosaics every 50 steps.

    python docs/results/vlm_testbed/lm_probe.py LR STEPS LAYERS 0 CELL_CODE
    # measured (2 threads, 0.7-0.8 s a step; first-turn accuracy % at steps 50 / 100 / 150 / 200):
    #   1e-3 200 4 0 0  -> position 42 / 34 / 30 / 39, presence 59 / 48 / 50 / 59, count 62 / 57 / 55 / 50
    #   1e-3 200 4 0 3  -> position 42 / 44 / 100 / 100, presence 48 / 46 / 50 / 59, count 62 / 57 / 55 / 50
    #   1e-3 350 4 0 3  -> as above, then position 100 and presence 44-50, count 48-58 at steps 250-350

Without a code shared by a cell's tokens the model only learns to name *some* class present in the image
(position 30-40%, chance 10%); with it, it reads the asked cell perfectly within 150 steps. Presence and
counts, which need a class word matched against the tokens, stay at chance either way.
"""
import sys
import time

import torch
import torch.nn.functional as F
from tokenprune.eval import train_vlm_testbed as T
from transformers import LlavaForConditionalGeneration

from tokenprune import vlm_testbed as vt

torch.set_num_threads(2)
lr, steps, layers = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cell_code_scale = float(sys.argv[5])
cfg = vt.vlm_testbed_config()
cfg.text_config.num_hidden_layers = layers
torch.manual_seed(0)
m = LlavaForConditionalGeneration(cfg).train()
lm, lmh = m.model.language_model, m.lm_head
tok = vt.vlm_testbed_processor().tokenizer
conv = T.Conversations(tok, 196)
cls = torch.nn.Embedding(10, 128)
cellpos = torch.nn.Embedding(4, 128)
side = torch.arange(14) // 7
cellidx = (2 * side[:, None] + side[None, :]).flatten()
pos = torch.nn.Parameter(torch.randn(196, 128) * 0.1)
params = list(lm.parameters()) + list(lmh.parameters()) + list(cls.parameters()) + list(cellpos.parameters()) + [pos]
opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
g = torch.Generator().manual_seed(0)


def features(cells):
    return cls(T.token_cells(cells)) + pos + cellpos(cellidx) * cell_code_scale


t0 = time.time()
for step in range(steps):
    cells = torch.randint(0, 10, (32, 4), generator=g)
    rep = torch.randint(0, 10, (32, 1), generator=g).expand(32, 4)
    mask = (torch.rand(32, 1, generator=g) < .5) & (torch.rand(32, 4, generator=g) < .5)
    cells = torch.where(mask, rep, cells)
    turns = [[vt.ask(cells[i], g) for _ in range(4)] for i in range(32)]
    b = conv.batch([conv.encode(t) for t in turns])
    emb = lm.embed_tokens(b['input_ids']).masked_scatter((b['input_ids'] == vt.IMAGE)[..., None], features(cells))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        lo = lmh(lm(inputs_embeds=emb, attention_mask=b['attention_mask']).last_hidden_state)
    loss = F.cross_entropy(lo[:, :-1].float().flatten(0, 1), b['labels'][:, 1:].flatten(), ignore_index=-100)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if (step + 1) % 50 == 0:
        with torch.no_grad():
            acc = {k: [] for k in vt.KINDS}
            cells = torch.randint(0, 10, (96, 4), generator=g)
            for k in vt.KINDS:
                ts = [vt.ask(cells[i], g, k) for i in range(96)]
                enc = [conv.encode([t]) for t in ts]
                bb = conv.batch(enc)
                e = lm.embed_tokens(bb['input_ids']).masked_scatter((bb['input_ids'] == vt.IMAGE)[..., None],
                                                                   features(cells))
                with torch.autocast('cpu', dtype=torch.bfloat16):
                    l2 = lmh(lm(inputs_embeds=e, attention_mask=bb['attention_mask']).last_hidden_state)
                for r, (ids, lab) in enumerate(enc):
                    f = next(j for j, v in enumerate(lab) if v != -100)
                    acc[k].append(int(l2[r, f - 1].argmax()) == lab[f])
        print(step + 1, f"loss {loss.item():.3f}", {k: round(100 * sum(v) / len(v)) for k, v in acc.items()},
              f"{time.time() - t0:.0f}s", flush=True)
