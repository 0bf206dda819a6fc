"""``tokenprune eval``: top-1 / top-5 of a classifier over a grid of methods and keep values.

One run evaluates the unpruned baseline and every ``--method`` x ``--keep`` pair on the same data,
writes one JSON line per configuration as soon as it finishes (and rewrites the CSV beside it),
and with ``--resume`` skips the configurations an interrupted run already finished. Several
processes (``accelerate launch -m tokenprune.eval ...``) each take a shard of the data; the counts
are gathered exactly (``gather_for_metrics`` drops the padding of the last batch).

images/s here is the model's forward throughput during evaluation (data loading excluded), a
rough guide only; speed claims come from ``tokenprune bench``, which interleaves the two models.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import functools
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

import tokenprune
from tokenprune import extension, testbed
from tokenprune.cli import (
    ArgumentParser,
    add_device_arguments,
    add_option_argument,
    check_device,
    check_model_name,
    check_writable,
    count,
    options_by_method,
    torch_dtype,
)
from tokenprune.registry import KEEP_OVERRIDES, keep_overridden
from tokenprune.speed import CompiledOutputChanged, never_eager_fallback, verify_compiled

from .data import EMBEDDED, EMBEDDED_SPECS, build_dataset, embedded_spec_for, looks_like_path, skip_reason

TESTBED = "vit_testbed_fmnist"
TIMM_SOURCES = ("hf-hub:", "hf_hub:", "local-dir:")  # timm model names with a source prefix


@dataclass
class Config:
    method: str | None  # None: the unpruned baseline
    keep: float | None  # None for a method whose options set its token counts (``keep_overridden``)
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.method is None:
            return "baseline"
        keep = "" if self.keep is None else f" keep={self.keep}"
        return f"{self.method}{keep}" + "".join(f" {k}={v}" for k, v in self.options.items())


def sweep(methods: list[str], keeps: list[float], options: dict[str, dict], notes: list[str]) -> list[Config]:
    """The configurations of a sweep, the baseline first: each method at each keep, or once, with no keep, where its
    options set the token counts instead (ToMe's or MCTF's ``r``, MCTF's ``fast``, Zero-TPrune's ``keep_rates``, a
    selector's ``tokens``): at every keep it would be the same configuration evaluated again, each row labelled with
    a keep it does not use. A line in ``notes`` says so."""
    configs = [Config(None, None)]
    for m in methods:
        if not keep_overridden(options[m]):
            configs += [Config(m, k, options[m]) for k in keeps]
            continue
        if keeps:
            notes.append(f"note: {m}: {count_setting(options[m])} sets its token counts, not --keep: evaluated once")
        configs.append(Config(m, None, options[m]))
    return configs


def count_setting(options: dict) -> str:
    """The options that set a method's token counts instead of keep, as ``-o`` writes them (``r=8``)."""
    return " ".join(f"{k}={v}" for k, v in options.items() if k in KEEP_OVERRIDES)


def budget_label(row: dict) -> str:
    """A result's budget as a plot labels its point: its keep, else the options that set its token counts."""
    return count_setting(row["options"]) if row["keep"] is None else f"{row['keep']:.3g}"


def is_hf_name(name: str) -> bool:
    """A transformers model: a local folder with a config.json, or a hub id (``org/name``) that timm
    does not know (timm's own hub names start with ``hf-hub:`` / ``hf_hub:``)."""
    if Path(name, "config.json").is_file():
        return True
    return "/" in name and not name.startswith((*TIMM_SOURCES, "timm/")) and not Path(name).exists()


class HFClassifier(torch.nn.Module):
    """A transformers image classifier behind timm's interface: ``forward(images) -> logits``, and a
    ``pretrained_cfg`` holding the input size its image processor gives (what timm's data config reads); its
    images are the processor's own (``eval_transform``)."""

    def __init__(self, model: torch.nn.Module, processor) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.pretrained_cfg = dict(input_size=processor_input_size(processor, model.config))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).logits


def processor_input_size(processor, config) -> tuple[int, int, int]:
    """(channels, height, width) of the pixel values an HF image processor gives: its crop where it centre-crops,
    else its resize target (the model's image size where the processor names none). The only field of the timm
    data config an ``HFClassifier`` uses: its images are the processor's own (``ProcessorTransform``)."""
    size = dict(getattr(processor, "size", None) or {})
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    if crop:
        height, width = crop["height"], crop["width"]
    else:  # resized straight to the target size (ViT, DeiT without crop, SigLIP)
        height = size.get("height", size.get("shortest_edge", config.image_size))
        width = size.get("width", height)
    return getattr(config, "num_channels", 3), height, width


class ProcessorTransform:
    """An image processor as a per-image transform: the pixel values the processor itself gives. timm's transform
    from the equivalent data config is not those pixels: the processors resize with their own kernels (torchvision's,
    antialiased, on tensors), and crop at (size - crop) // 2 where torchvision rounds."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def eval_transform(model: torch.nn.Module, data_config: dict):
    """What each image goes through: a transformers model's own image processor, else timm's eval transform for
    ``data_config``."""
    if isinstance(model, HFClassifier):
        return ProcessorTransform(model.processor)
    from timm.data import create_transform

    return create_transform(**data_config, is_training=False)


def model_num_classes(model: torch.nn.Module) -> int | None:
    """Output classes of a timm model or an ``HFClassifier``."""
    if isinstance(model, HFClassifier):
        return model.model.config.num_labels
    return getattr(model, "num_classes", None) or None


def load_hf_model(name: str, pretrained: bool) -> torch.nn.Module:
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    try:
        processor = AutoImageProcessor.from_pretrained(name)
        if pretrained:
            model = AutoModelForImageClassification.from_pretrained(name)
        else:
            model = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(name))
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"could not load the transformers image classifier {name!r} (a local folder, or a hub "
                         f"id in the local cache or reachable): {reason}") from e
    return HFClassifier(model, processor)


def load_model(name: str, pretrained: bool, checkpoint: str | None, seed: int = 0) -> torch.nn.Module:
    """A timm model (weights from the registry with ``pretrained``) or a transformers image classifier
    (hub id or local folder; see ``is_hf_name``), or either with weights from a local checkpoint
    file. Seeded, so that a random-init model (``--no-pretrained``) is the same in every run."""
    import timm

    import tokenprune.testbed  # noqa: F401  (registers the testbed with timm)

    prefixed = name.startswith(TIMM_SOURCES)
    if not prefixed and looks_like_path(name) and not Path(name).expanduser().exists():  # a typo: no hub lookup
        raise ValueError(f"--model {name}: no such folder (a local transformers model folder, a hub id "
                         f"org/name, or a timm name)")
    state = read_checkpoint(checkpoint) if checkpoint else None
    torch.manual_seed(seed)
    if is_hf_name(name):
        model = load_hf_model(name, pretrained and checkpoint is None)
        if state is not None:
            load_weights(model.model, state, checkpoint, name)
        return model.eval()
    check_model_name(name, transformers_ok="a transformers hub id (org/name) or local folder")
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None)
    except RuntimeError as e:
        raise ValueError(f"could not create {name!r}: {e}") from e
    except OSError as e:
        raise ValueError(f"could not load pretrained weights for {name!r} ({e}); pass --checkpoint PATH "
                         f"or --no-pretrained") from e
    if state is not None:
        load_weights(model, state, checkpoint, name)
    return model.eval()


def load_weights(model: torch.nn.Module, state: dict, path: str, name: str) -> None:
    """``load_state_dict``, after naming (a few of) the missing, unexpected and wrongly shaped keys in one line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = [f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for what, keys in (("missing key(s)", missing), ("unexpected key(s)", unexpected),
                                   ("shape mismatch(es), checkpoint vs model", shapes)) if keys]
    if problems:
        raise ValueError(f"--checkpoint {path} does not fit {name}: {'; '.join(problems)}")
    model.load_state_dict(state)


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """safetensors, or a torch file read with ``weights_only=True`` (never arbitrary pickles)."""
    import pickle

    from safetensors import SafetensorError

    if not Path(path).is_file():
        raise ValueError(f"--checkpoint {path}: no such file")
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, SafetensorError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--checkpoint {path}: not a readable weights file (.safetensors, or a torch file of "
                         f"tensors that loads with weights_only=True): {reason}") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--checkpoint {path}: not a state dict (a mapping of names to tensors)")
    return state


def configured(model, configs: list[Config], run: dict, finished: dict[str, dict], rows: list[dict], accelerator,
               **settings):
    """Each configuration an earlier run did not finish, with ``model`` patched for it (unpatched for the
    baseline), and its key; a finished one goes straight into ``rows``. ``settings``: ``apply``'s own
    (``positions``)."""
    for config in configs:
        key = config_key(run, config)
        if key in finished:
            rows.append(finished[key])
            accelerator.print(f"[resume] {config.label}: already done")
            continue
        if config.method is None:
            if tokenprune.is_patched(model):
                tokenprune.remove(model)
        else:
            tokenprune.apply(model, config.method, keep=config.keep, **settings, **config.options)
        yield config, key


def config_key(run: dict, config: Config) -> str:
    return json.dumps({**run, "method": config.method, "keep": config.keep, "options": config.options},
                      sort_keys=True, default=str)


#: the fields every row of each command holds: how ``--resume`` tells a results file of its command from any other
#: file, the other eval command's results included
ROW_FIELDS = {"tokenprune eval": ("key", "method", "keep", "options", "top1", "top5", "images"),
              "tokenprune eval-vlm": ("key", "method", "keep", "options", "metric", "accuracy", "questions")}
#: how every row begins (``append_result`` writes a dict whose first item is its key): a line an interruption tore
#: begins so too
ROW_START = b'{"key": '


def parsed(line: bytes):
    """A line's JSON value, or None where the line is not JSON."""
    try:
        return json.loads(line)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return None


def is_row(value, tool: str) -> bool:
    return isinstance(value, dict) and all(name in value for name in ROW_FIELDS[tool])


def is_torn(line: bytes) -> bool:
    """A row cut short: not JSON, and it begins as a row does."""
    return parsed(line) is None and (line.startswith(ROW_START) or ROW_START.startswith(line))


def read_results(path: Path, tool: str) -> tuple[dict[str, dict], int | None]:
    """``tool``'s rows in ``path`` by key, and, when an interruption tore the last line, the size of the file
    without it (else None). Each row is appended in one write, so only the last line (no newline after it) can be
    torn: any other line that is not a row of ``tool`` means the file is something else (or the other eval
    command's results), a one-line ValueError, and the file is left as it is."""
    data = path.read_bytes() if path.exists() else b""
    lines = data.split(b"\n")
    rows = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = parsed(line)
        if is_row(row, tool):
            rows[row["key"]] = row
        elif number == len(lines) and is_torn(line):
            return rows, len(data) - len(line)
        else:
            raise ValueError(not_a_row(path, number, row, tool))
    return rows, None


def not_a_row(path: Path, number: int, value, tool: str) -> str:
    other = next((name for name in ROW_FIELDS if name != tool and is_row(value, name)), None)
    if other:
        what = f"a {other} row"
    elif isinstance(value, dict):
        what = "no " + ", ".join(name for name in ROW_FIELDS[tool] if name not in value)
    else:
        what = "not a JSON object"
    return (f"{path}, line {number}: not a {tool} results row ({what}); --resume continues a results file {tool} "
            "wrote: pass another --output, or --overwrite to replace this file")


def remove_torn_line(path: Path, whole: int) -> str:
    """``path`` without its torn last line (``read_results``' ``whole`` bytes), before more rows are appended;
    what was removed, in words."""
    data = path.read_bytes()
    write_atomically(path, lambda tmp: tmp.write_bytes(data[:whole]))
    number = data[:whole].count(b"\n") + 1
    return f"removed the torn last line of {path} (line {number}, {len(data) - whole} bytes)"


def write_atomically(path: Path, write) -> None:
    """``write(tmp)`` writes a file beside ``path``, which is then renamed over it: an interruption leaves the old
    file or the new one, never a part of one (a rename within a folder is atomic)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before it takes the old file's place
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def append_result(path: Path, row: dict) -> None:
    # A run killed mid-write leaves half a line: start on a fresh one.
    torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:
        f.write(("\n" if torn else "") + json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


COLUMNS = ["method", "keep", "options", "top1", "top5", "delta_top1", "gflops", "images_per_s", "speedup",
           "images", "skipped", "skip_reasons", "foreign_load"]


def with_deltas(rows: list[dict]) -> list[dict]:
    base = next((r for r in rows if r["method"] is None), None)
    out = []
    for r in rows:
        r = dict(r)
        r["delta_top1"] = None if base is None else r["top1"] - base["top1"]
        r["speedup"] = None if base is None else r["images_per_s"] / base["images_per_s"]
        out.append(r)
    return out


def write_csv(path: Path, rows: list[dict], columns: list[str] = COLUMNS) -> None:
    """The rows as CSV (``write_atomically``), the baseline named, options as JSON."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow({**r, "method": r["method"] or "baseline", "options": json.dumps(r["options"]),
                                 "skip_reasons": json.dumps(r.get("skip_reasons", {}))})
    write_atomically(path, write)


def format_table(rows: list[dict]) -> str:
    names = [r["method"] or "baseline" for r in rows]
    options = [",".join(f"{k}={v}" for k, v in r["options"].items()) for r in rows]
    mw, ow = max([10, *map(len, names)]), max([14, *map(len, options)])  # columns fit their longest entry
    head = (f"{'method':<{mw}} {'keep':>5} {'options':<{ow}} {'top-1':>7} {'top-5':>7} {'delta':>7} "
            f"{'GFLOPs':>8} {'img/s':>8} {'speedup':>7}")
    lines = [head, "-" * len(head)]

    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    for r, name, opts in zip(rows, names, options):
        lines.append(f"{name:<{mw}} {fmt(r['keep'], '>5.2f'):>5} {opts:<{ow}} "
                     f"{r['top1']:>7.2f} {r['top5']:>7.2f} {fmt(r['delta_top1'], '+7.2f'):>7} "
                     f"{r['gflops']:>8.4f} {r['images_per_s']:>8.1f} {fmt(r['speedup'], '>6.2f') + 'x':>7}")
    return "\n".join(lines)


def plot(path: Path, rows: list[dict], title: str, x: str = "gflops", y: str = "top1",
         labels: tuple[str, str] = ("GFLOPs per image", "top-1 (%)")) -> None:
    """``y`` against ``x``, one line per method with each point's keep, the baseline as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    base = next((r for r in rows if r["method"] is None), None)
    for method in sorted({r["method"] for r in rows if r["method"]}):
        pts = sorted(((r[x], r[y], budget_label(r)) for r in rows if r["method"] == method), key=lambda p: p[:2])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        for px, py, budget in pts:
            ax.annotate(budget, (px, py), textcoords="offset points", xytext=(3, 3), fontsize=7)
    if base:
        ax.plot([base[x]], [base[y]], marker="*", markersize=14, color="k", linestyle="", label="baseline")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    # the format by the name's extension, which the temporary name (NAME.png.tmp) lacks
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix[1:].lower()))
    plt.close(fig)


def amp_context(device: torch.device, amp: bool):
    """``--amp``'s autocast (bfloat16 on CPU, float16 elsewhere), or a context that does nothing."""
    return torch.autocast(device.type, dtype=amp_dtype(device)) if amp else contextlib.nullcontext()


def amp_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cpu" else torch.float16


def other_batch_sizes(loader, first: int) -> list[int]:
    """The sizes of this process's batches other than ``first`` (a smaller last batch), largest first, read from the
    loader's batch sampler (indices only, no data loaded); none for an iterable dataset (its batch sampler draws from
    an endless sampler: its sizes are known only by loading it)."""
    from torch.utils.data import IterableDataset

    sampler = getattr(loader, "batch_sampler", None)
    if sampler is None or isinstance(loader.dataset, IterableDataset):
        return []
    return sorted({len(batch) for batch in sampler} - {first}, reverse=True)


def unpatched_copy(model):
    """``model``'s unpatched forward, as a function of the input: a copy with the patch removed, made at its first
    call."""
    copy_of = functools.cache(lambda: tokenprune.remove(copy.deepcopy(model)))
    return lambda x: copy_of()(x)


@torch.inference_mode()
def compiled(model, loader, dtype: torch.dtype, accelerator, amp: bool, what: str):
    """``tokenprune.compiled(model)`` (``torch.compile``; on CPU with inductor's C++ wrapper), compiled on every batch
    size this process will evaluate before anything is timed (the compile time is printed, not counted).

    Each of those compiles is ``tokenprune.speed.verify_compiled``, under ``--amp``'s autocast when it is on (the
    graph the evaluation runs): the compiled model must give the eager model's output on the first batch, and on its
    first samples at the size of a smaller last batch (which dynamo compiles as another graph), or the evaluation
    stops with ``CompiledOutputChanged`` (an accuracy measured on a compiled model that is not the configuration's
    would be reported under its name). Every process checks its own batch sizes, and all stop if one fails."""
    torch._dynamo.reset()  # each configuration patches the same model: a fresh compile, not a recompile
    runner = tokenprune.compiled(model)
    # the unpatched model, for how far the reduction moved a sample that moved (a near-tie choice moves it less): the
    # model itself for the baseline, else a copy, made only where the check calls it (it doubles the weights' memory)
    stock = unpatched_copy(model) if tokenprune.is_patched(model) else model
    x = next(iter(loader))[0].to(dtype)
    sizes = [len(x)] + [n for n in other_batch_sizes(loader, len(x)) if n < len(x)]
    lines, failure, compute_dtype = [], None, amp_dtype(accelerator.device) if amp else None
    with amp_context(accelerator.device, amp):
        try:
            for n in sizes:  # a tensor of its own, as the loader's last batch is
                lines.append(verify_compiled(runner, model, x[:n].clone(), what, compute_dtype, stock=stock))
        except CompiledOutputChanged as e:
            failure = e
    # one verdict for all processes: a process that stopped alone would leave the others waiting in a gather
    failed = accelerator.gather(torch.tensor([int(failure is not None)], device=accelerator.device))
    if failure is not None:
        raise failure
    if failed.any():
        raise CompiledOutputChanged(f"torch.compile changed {what}'s output in another process; not using it")
    for line in lines:
        accelerator.print("  " + line)
    return runner


@torch.inference_mode()
def evaluate_config(model, loader, accelerator, amp: bool, dtype: torch.dtype = torch.float32) -> dict:
    from tqdm.auto import tqdm

    from tokenprune.timing import ForeignLoad, timed

    device = accelerator.device
    autocast = amp_context(device, amp)
    top1 = top5 = images = 0
    skipped = Counter()
    forward_seconds, local_images = 0.0, 0
    with ForeignLoad() as load:  # other processes' CPU share: a busy spell skews images_per_s
        for x, y in tqdm(loader, disable=not accelerator.is_main_process, leave=False, unit="batch"):
            x = x.to(dtype)
            with autocast:
                logits, seconds = timed(lambda: model(x), device)  # CUDA: timed with CUDA events
            forward_seconds += seconds
            local_images += x.shape[0]
            ranked = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            valid = y >= 0  # negative labels: skipped images, by reason
            hit1 = (ranked[:, 0] == y) & valid
            hit5 = (ranked == y[:, None]).any(dim=-1) & valid
            hit1, hit5, y = accelerator.gather_for_metrics((hit1, hit5, y.to(device)))
            top1, top5, images = top1 + int(hit1.sum()), top5 + int(hit5.sum()), images + int((y >= 0).sum())
            skipped.update(skip_reason(int(label)) for label in y[y < 0].tolist())
    if images == 0:
        raise ValueError(f"no readable images in --data ({format_skips(dict(skipped))})")
    # on a GPU, or with several processes (which count one another as foreign), the CPU share says nothing
    alone = device.type == "cpu" and accelerator.num_processes == 1
    return dict(top1=100 * top1 / images, top5=100 * top5 / images, images=images, skipped=sum(skipped.values()),
                skip_reasons=dict(sorted(skipped.items())),
                images_per_s=accelerator.num_processes * local_images / max(forward_seconds, 1e-9),
                foreign_load=load.value if alone else None)


#: other processes' CPU share above which the speedup column of ``tokenprune eval`` is flagged as unreliable
BUSY = 0.05


def busy_note(rows: list[dict], column: str = "speedup", bench: str = "bench") -> str | None:
    """A line under the table when other processes used more than ``BUSY`` of the CPUs while a configuration
    ran: configurations run one after another, so a busy spell skews the timing ``column`` of those it hit (a
    0.23x seen on a machine running a test suite was 1.2x alone); ``tokenprune <bench>`` interleaves them."""
    loads = [(r.get("foreign_load"), r["method"] or "baseline") for r in rows]
    busiest = max(((v, name) for v, name in loads if v is not None), default=None)
    if busiest is None or busiest[0] <= BUSY:
        return None
    return (f"note: other processes used up to {busiest[0]:.0%} of the CPUs while this ran ({busiest[1]}): the "
            f"{column} column is unreliable; `tokenprune {bench}` times configurations interleaved")


def format_skips(reasons: dict[str, int]) -> str:
    total = sum(reasons.values())
    return f"skipped {total} unreadable image(s)" + (": " + ", ".join(f"{n} {why}" for why, n in reasons.items())
                                                     if reasons else "")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="tokenprune eval", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=TESTBED,
                   help=f"timm model name (default: the testbed, {TESTBED}), or a transformers image "
                        "classifier: hub id (e.g. google/vit-base-patch16-224) or local folder")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="load the pretrained weights (default on); off: random init from the config")
    p.add_argument("--checkpoint", help="weights file: .safetensors, or a torch file (read weights_only)")
    p.add_argument("--data",
                   help="'fashion-mnist' (the embedded test split; the default, or 'fashion-mnist-mosaic' for the "
                        "mosaic testbed), 'fashion-mnist:val' / 'fashion-mnist-mosaic:val' (the validation split: "
                        f"needs ${testbed.FMNIST_ROOT_ENV}), an ImageNet-val style folder, a saved HF dataset folder, "
                        "or a HF datasets name")
    p.add_argument("--class-map", metavar="JSON",
                   help="class index of each folder of an image-folder --data: a JSON object {\"folder\": index}")
    p.add_argument("--split", default="validation", help="split of a HF dataset")
    p.add_argument("--label-column", metavar="NAME",
                   help="a datasets --data's label column (default: 'label' or 'labels', else its first class-label "
                        "column)")
    p.add_argument("--image-column", metavar="NAME", help="a datasets --data's image column (default: its first)")
    p.add_argument("--method", nargs="+", default=[],
                   help="methods to sweep (default: every registered encoder method)")
    p.add_argument("--keep", nargs="+", type=float, default=[0.5], help="keep values to sweep")
    add_option_argument(p)  # each method of the sweep gets the options it declares
    p.add_argument("--batch-size", type=count(1), default=128)
    p.add_argument("--workers", type=count(0), default=0)
    add_device_arguments(p, auto=True)
    p.add_argument("--amp", action="store_true", help="autocast an fp32 model (bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="run each configuration (the baseline too) through torch.compile (tokenprune.compiled: on CPU "
                   "with inductor's C++ wrapper): compiled against compiled; compiling costs tens of seconds per "
                   "configuration on CPU, printed, not timed")
    p.add_argument("--seed", type=int, default=0, help="seed for random-init weights (--no-pretrained)")
    p.add_argument("--limit", type=count(1), help="evaluate the first N images only (N >= 1)")
    p.add_argument("--threads", type=count(1), help="torch CPU threads")
    add_output_arguments(p, "runs/eval", "top-1 vs GFLOPs")
    return p


def add_output_arguments(p: argparse.ArgumentParser, folder: str, plotted: str) -> None:
    """``--output``, ``--resume``, ``--overwrite`` and ``--plot``: shared with ``tokenprune eval-vlm``."""
    p.add_argument("--output", help="results file (.jsonl; a .csv is written beside it); "
                                    f"default {folder}/<model>-<data>.jsonl")
    # one or the other: --overwrite would delete the very results --resume was asked to keep
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="skip configurations already in --output")
    existing.add_argument("--overwrite", action="store_true", help="start --output afresh")
    p.add_argument("--plot", nargs="?", const="", metavar="PNG",
                   help=f"write {plotted} as a PNG (default: beside --output), or in any format matplotlib "
                        "writes, by the name's extension (.pdf, .svg, ...)")


def plot_formats() -> list[str]:
    """The file extensions matplotlib's ``savefig`` writes (png, pdf, svg, ...), without the dot."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as e:  # an optional dependency: missing, said before the evaluation, not after it
        raise ValueError("--plot needs matplotlib: pip install 'tokenprune-vit[plot]'") from e

    return sorted(FigureCanvasBase.get_supported_filetypes())


def output_paths(args, folder: str, model: str, tool: str = "tokenprune eval") -> tuple[Path, Path | None]:
    """The results file and the plot (None without ``--plot``), checked before any work, so a bad path never
    costs an evaluation: an existing file needs ``--resume`` or ``--overwrite``, and ``--resume`` a file of
    ``tool``'s results (``read_results``); the plot's name must end in a format matplotlib writes; the results,
    their CSV and the plot must be three files (each would overwrite another); every path must be writable."""
    slug = Path(args.data).name or args.data
    output = Path(args.output or f"{folder}/{Path(model).name}-{slug}.jsonl")
    if output.exists() and not (args.resume or args.overwrite):
        raise ValueError(f"{output} exists: pass --resume to continue it or --overwrite to start afresh")
    png = (Path(args.plot) if args.plot else output.with_suffix(".png")) if args.plot is not None else None
    if png is not None and png.suffix[1:].lower() not in plot_formats():
        raise ValueError(f"--plot {png}: matplotlib cannot write {png.suffix or 'a name without an extension'}; "
                         f"give a name ending in one of .{', .'.join(plot_formats())}")
    files = [("--output", output), ("--output's CSV", output.with_suffix(".csv"))] + ([("--plot", png)] if png else [])
    first = {}
    for what, path in files:
        earlier = first.setdefault(path.resolve(), what)
        if earlier != what:
            raise ValueError(f"{earlier} and {what} would be the same file, {path}: the results (--output, JSON "
                             "lines: e.g. NAME.jsonl), their CSV (NAME.csv, beside them) and --plot must be three "
                             "different files")
    for what, path in files:
        check_writable(path, what)
    if args.resume:
        read_results(output, tool)
    return output, png


def make_accelerator(device):
    """accelerate's ``Accelerator`` for ``--device`` (None: auto). One process on ``cuda:N`` uses that GPU;
    under a multi-process launch each process takes its own, so a fixed index is refused there."""
    from accelerate import Accelerator

    if device is not None and device.index is not None:  # one process: accelerate's "cuda" is the current device
        torch.cuda.set_device(device)
    # no --device on a machine without an accelerator: cpu=True all the same, which is what makes accelerate join the
    # processes of a torchrun launch (without it each process ran alone and every one wrote every result)
    cpu = device.type == "cpu" if device is not None else not torch.accelerator.is_available()
    accelerator = Accelerator(cpu=cpu)
    if device is not None and device.index is not None and accelerator.num_processes > 1:
        raise ValueError(f"--device {device} picks one GPU; under a multi-process launch each process takes "
                         "its own: pass --device cuda")
    return accelerator


def finished_results(args, output: Path, png: Path | None, accelerator, tool: str) -> dict[str, dict]:
    """The configurations an earlier run of ``tool`` finished (``--resume``: ``read_results``, in every process,
    before the main one removes a torn last line), or none: ``--overwrite`` removes the old results, their CSV and
    plot (``png``, else the default one beside ``output``), which would otherwise describe another run until this
    one rewrites them."""
    finished, whole = read_results(output, tool) if args.resume else ({}, None)
    if accelerator.is_main_process:
        if args.overwrite:
            for path in (output, output.with_suffix(".csv"), png or output.with_suffix(".png")):
                path.unlink(missing_ok=True)
        if whole is not None:
            print(f"[repair] {remove_torn_line(output, whole)}")
    accelerator.wait_for_everyone()
    return finished


def run_settings(args, accelerator) -> dict:
    """What a run's timings depend on beyond its model and data, for its key (a resume under other settings is
    another run, not a speedup over a baseline timed under these): the kind of device (not its index: under a
    multi-process launch each process has its own, and all must compute the same key), the number of processes
    (their throughputs add up), the batch size (a seeded random method also draws by position in the batch) and the
    CPU threads."""
    return dict(device=accelerator.device.type, processes=accelerator.num_processes, batch_size=args.batch_size,
                threads=torch.get_num_threads())


def data_settings(dataset) -> dict:
    """What the data adds to a run's key beyond ``--data``: its size (a folder that gained or lost images is another
    run) and, for an image folder, a digest of its class indices (another ``--class-map`` scores other labels); for a
    ``datasets`` split with several class-label columns or a ``--label-column`` other than the default, the one scored
    (before 2026-12-06 the first class-label column was, not ``label``: such runs resume nothing), and with several
    image columns, the one read."""
    settings = {"samples": len(dataset)}
    classes = getattr(dataset, "classes", None)
    if classes:
        settings["classes"] = hashlib.sha256(json.dumps(sorted(classes.items())).encode()).hexdigest()[:12]
    if getattr(dataset, "other_label_columns", None) or getattr(dataset, "label_key", None) != getattr(
            dataset, "default_label_key", None):  # another column than the default: another run
        settings["label_column"] = dataset.label_key
    if getattr(dataset, "several_image_columns", False):
        settings["image_column"] = dataset.image_key
    return settings


def distinct(values: list, flag: str, notes: list[str]) -> list:
    """``values`` each once, in order; a repeat adds a line to ``notes`` (evaluated twice, it would only write the
    same configuration's row twice)."""
    repeated = [str(value) for value, n in Counter(values).items() if n > 1]
    if repeated:
        notes.append(f"note: {flag} {' '.join(repeated)} given more than once: evaluated once")
    return list(dict.fromkeys(values))


def main(argv: list[str] | None = None) -> list[dict]:
    from timm.data import resolve_data_config
    from torch.utils.data import DataLoader, Subset

    from tokenprune.registry import EncoderReducer, method_names

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # default: every encoder method (VLM selectors such as hiprune need a VLM, not a classifier)
    encoder = [m for m in method_names() if issubclass(tokenprune.registry.get_method(m), EncoderReducer)]
    notes = []  # printed below by the main process alone (the processes are not joined yet)
    methods, keeps = distinct(args.method or encoder, "--method", notes), distinct(args.keep, "--keep", notes)
    for m in methods:  # fail on a bad method, keep or option before any work
        tokenprune.registry.get_method(m)  # an unknown method is named before its options
        if m not in encoder:
            raise ValueError(f"--method {m} reduces the visual tokens of a vision-language model; an image "
                             f"classifier takes: {', '.join(encoder)}")
    options = options_by_method(methods, args.option)
    for m in methods:
        tokenprune.registry.get_method(m)(keep=keeps[0], **options[m])
    for k in keeps:
        tokenprune.registry.check_keep(k)
    configs = sweep(methods, keeps, options, notes)
    device = None if args.device == "auto" else check_device(args.device)
    if args.amp and args.dtype != "fp32":
        raise ValueError(f"--amp autocasts an fp32 model; with --dtype {args.dtype} the model already runs in "
                         f"{args.dtype}: pass one of them")
    dtype = torch_dtype(args.dtype)

    own = testbed.TESTBEDS.get(args.model)
    if args.data is None:  # a testbed's own task; any other model: the embedded Fashion-MNIST
        args.data = embedded_spec_for(own.task) if own else EMBEDDED
    if own and args.data in EMBEDDED_SPECS and EMBEDDED_SPECS[args.data][0] != own.task:
        raise ValueError(f"--data {args.data}: {args.model} was trained on {embedded_spec_for(own.task)} "
                         "(the image would be resized into another task); pass that or leave --data out")
    output, png = output_paths(args, "runs/eval", args.model)
    accelerator = make_accelerator(device)
    model = load_model(args.model, args.pretrained, args.checkpoint, args.seed).to(accelerator.device, dtype)
    data_config = resolve_data_config(model=model)
    transform = eval_transform(model, data_config)
    dataset, data_desc = build_dataset(args.data, transform, data_config["input_size"], args.split,
                                       num_classes=model_num_classes(model), class_map=args.class_map,
                                       label_column=args.label_column, image_column=args.image_column)
    for note in (*notes, getattr(dataset, "class_note", ""), getattr(dataset, "ignored", "")):
        if note:
            accelerator.print(note)
    run_data = data_settings(dataset)  # the whole data's, before --limit (which the key holds)
    if args.limit:
        dataset = Subset(dataset, range(min(args.limit, len(dataset))))
    loader = accelerator.prepare(DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers))

    finished = finished_results(args, output, png, accelerator, "tokenprune eval")

    run = dict(model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained, data=args.data,
               split=args.split, limit=args.limit, amp=args.amp,
               seed=None if args.pretrained or args.checkpoint else args.seed,
               **run_data, **run_settings(args, accelerator))
    if args.dtype != "fp32":  # another dtype, other results (named only when set: report.py reads none as fp32)
        run["dtype"] = args.dtype
    if args.compile:  # the same accuracy is expected, but other timings: kept apart for --resume
        run["compile"] = True
    if isinstance(model, HFClassifier):  # its processor's own pixels (timm's transform before 2026-12-06)
        run["pixels"] = "processor"
    for config in configs[1:]:  # what only this model can refuse (layers past its depth, ...): before any image
        tokenprune.remove(tokenprune.apply(model, config.method, keep=config.keep, **config.options))
    if any(config.method for config in configs):  # built (once, ~30 s) or loaded now, not inside a timed forward
        extension.kernels_in_use(accelerator.device, compiled=args.compile)
    rows = []
    for config, key in configured(model, configs, run, finished, rows, accelerator):
        flops = tokenprune.count_flops(model, tuple(data_config["input_size"]))
        accelerator.print(f"{config.label}: {flops.gflops_per_sample:.4f} GFLOPs/image")
        # compiled: a reached recompile limit is an error, not an eager run reported as the compiled one
        with never_eager_fallback() if args.compile else contextlib.nullcontext():
            runner = (compiled(model, loader, dtype, accelerator, args.amp, f"{args.model} ({config.label})")
                      if args.compile else model)
            row = dict(key=key, model=args.model, data=data_desc, method=config.method, keep=config.keep,
                       options=config.options, gflops=flops.gflops_per_sample, dtype=args.dtype,
                       **evaluate_config(runner, loader, accelerator, args.amp, dtype))
        if accelerator.is_main_process:
            append_result(output, row)
            write_csv(output.with_suffix(".csv"), with_deltas(rows + [row]))
        rows.append(row)
    rows = with_deltas(rows)
    if accelerator.is_main_process:
        write_csv(output.with_suffix(".csv"), rows)
        print(f"\n{args.model} on {data_desc}" + (f", first {args.limit}" if args.limit else "")
              + (f", {args.dtype}" if args.dtype != "fp32" else ""))
        print(format_table(rows))
        if (note := busy_note(rows)) is not None:
            print(note)
        if rows[0]["skipped"]:
            print(format_skips(rows[0].get("skip_reasons") or {"(reasons not recorded)": rows[0]["skipped"]}))
        print(f"results: {output} and {output.with_suffix('.csv')}")
        if png is not None:
            plot(png, rows, f"{args.model} on {data_desc}")
            print(f"plot: {png}")
    return rows
