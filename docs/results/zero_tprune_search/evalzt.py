"""Evaluate token-pruning configs on a validation split carved from Fashion-MNIST *train*
(last N_VAL images) or on the 10k test split. Usage:
  python evalzt.py --split val --out val.jsonl --configs configs.json
configs.json: list of {"name":..., "method":..., "keep":..., "opts":{...}}
Appends one JSON line per (config) to --out; skips entries already there (by name+split+keep).
"""
import argparse
import json
import os
import time

import timm
import torch

import tokenprune
from tokenprune.testbed import load_fashion_mnist, normalize_images

torch.set_num_threads(1)
ap = argparse.ArgumentParser()
ap.add_argument("--split", choices=["val", "test"], required=True)
ap.add_argument("--nval", type=int, default=5000)
ap.add_argument("--out", required=True)
ap.add_argument("--configs", required=True)
ap.add_argument("--bs", type=int, default=256)
a = ap.parse_args()

if a.split == "val":
    imgs, labels = load_fashion_mnist("train", "/work/shared/data/fashion-mnist")
    imgs, labels = imgs[-a.nval:], labels[-a.nval:]
else:
    imgs, labels = load_fashion_mnist("test", "/work/shared/data/fashion-mnist")
x_all = normalize_images(imgs)

done = set()
if os.path.exists(a.out):
    for line in open(a.out):
        r = json.loads(line)
        done.add((r["name"], r["split"], r["keep"], r["n"]))
configs = json.load(open(a.configs))
model = timm.create_model("vit_testbed_fmnist", pretrained=True).eval()
for c in configs:
    key = (c["name"], a.split, c["keep"], len(labels))
    if key in done:
        continue
    t0 = time.time()
    if c["method"] != "none":
        tokenprune.apply(model, c["method"], keep=c["keep"], **c.get("opts", {}))
    gf = tokenprune.count_flops(model).gflops_per_sample
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(labels), a.bs):
            correct += (model(x_all[i:i + a.bs]).argmax(-1) == labels[i:i + a.bs]).sum().item()
    if c["method"] != "none":
        tokenprune.remove(model)
    r = dict(name=c["name"], method=c["method"], keep=c["keep"], opts=c.get("opts", {}), split=a.split,
             n=len(labels), top1=100.0 * correct / len(labels), gflops=round(gf, 4), secs=round(time.time() - t0, 1))
    print(json.dumps(r), flush=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(r) + "\n")
