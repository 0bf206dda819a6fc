"""Train a model of the testbed family (``tokenprune.testbed.TESTBEDS``) on Fashion-MNIST (CPU).

Usage::

    python -m tokenprune.eval.train_testbed --model vit_testbed_mosaic \\
        --data-root FASHION_MNIST_FOLDER          # -> tokenprune/weights/vit_testbed_mosaic.safetensors

Design notes (why things are the way they are):

* The architecture comes from ``tokenprune.testbed.TESTBEDS`` so the packaged weights always
  match the registered timm model; this script only decides *how* to train.
* The last ``VAL_SIZE`` (5,000) training images are held out as the validation split on which
  pruning defaults are chosen (``--no-val-split`` trains on all 60k, as ``vit_testbed_fmnist`` did).
  Mosaic training samples are composed afresh every epoch (each held-in garment is the target once
  per epoch; the three others are drawn from the held-in garments), so the model never sees a
  validation or test garment.
* Reproducible: the model init uses ``torch.manual_seed(seed)``; the data order and augmentation
  of epoch ``e`` come from a generator seeded with ``(seed, e)``, so a run resumed from a
  checkpoint sees exactly the batches the uninterrupted run would have seen.
* Augmentation is done on whole uint8 batches with tensor indexing (random 28x28 crop from the
  image zero-padded by 2, horizontal flip): no DataLoader worker processes, which on a 2-core
  machine would only compete with the training threads.
* bf16 autocast is used by default: on a CPU with AVX512-BF16 it measured ~2.3x faster than fp32
  for this model, while the master weights, optimizer state and saved weights stay fp32.
* Adaptive threads (default on): the 2 cores are shared with interactive work. Measured here,
  a niced 2-thread job next to a busy 1-core process drops from ~90 to ~18-37 img/s (each
  OpenMP barrier waits for the thread that lost its core), while 1 thread keeps ~46 img/s. So
  every few steps the CPU time used by *other* processes is read from /proc/stat and the job
  runs with 1 thread while they use more than half a core, ``--threads`` otherwise. Changing
  the thread count changes float summation order, so bit-exact reruns need
  ``--no-adaptive-threads``; the data order and augmentation stay exactly reproducible.
* The full training state is checkpointed every epoch and every ``--ckpt-minutes`` minutes
  (atomically), and eval-ready fp32 weights are exported after every epoch, so a killed job
  still leaves usable weights behind.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay

from tokenprune import testbed as tb


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--data-root', default=os.environ.get(tb.FMNIST_ROOT_ENV),
                   help=f'folder with the Fashion-MNIST *-ubyte.gz files (train and test); default: '
                        f'${tb.FMNIST_ROOT_ENV}')
    p.add_argument('--model', default='vit_testbed_fmnist', choices=sorted(tb.TESTBEDS),
                   help='which testbed to train')
    p.add_argument('--out', help='output .safetensors (eval-ready weights); default: the packaged path')
    p.add_argument('--ckpt-dir', help='where full training checkpoints go; default: runs/<model>')
    p.add_argument('--val-split', action=argparse.BooleanOptionalAction, default=True,
                   help=f'hold out the validation split (the last {tb.VAL_SIZE} training images); '
                        '--no-val-split trains on all of them, as vit_testbed_fmnist did')
    p.add_argument('--resume', action='store_true', help='resume from <ckpt-dir>/last.pt if it exists')
    p.add_argument('--ckpt-minutes', type=float, default=10.0, help='also checkpoint every N minutes mid-epoch')
    p.add_argument('--epochs', type=int, default=6)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--lr', type=float, default=1e-3, help='peak AdamW learning rate')
    p.add_argument('--min-lr', type=float, default=1e-5, help='final learning rate of the cosine decay')
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--warmup-steps', type=int, default=300, help='linear warmup length in optimizer steps')
    p.add_argument('--label-smoothing', type=float, default=0.1)
    p.add_argument('--drop-path', type=float, default=0.0, help='stochastic depth rate (training only)')
    p.add_argument('--precision', choices=['bf16', 'fp32'], default='bf16', help='autocast dtype for training')
    p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
    p.add_argument('--adaptive-threads', action=argparse.BooleanOptionalAction, default=True,
                   help='drop to 1 thread while other processes keep a core busy')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--eval-batch-size', type=int, default=250)
    p.add_argument('--log-every', type=int, default=50, help='progress line every N steps')
    p.add_argument('--max-steps', type=int, default=0,
                   help='stop after this many optimizer steps (smoke tests / timing; 0 = full run)')
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

PAD = 2  # random-crop padding (pixels)


def augment_batch(images_padded: torch.Tensor, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 28x28 crop from the zero-padded 32x32 images + random horizontal flip.

    ``images_padded`` is the uint8 training set padded once up front ([N, 32, 32]); the crop is
    a gather with per-sample offsets, so the whole batch is augmented in a few tensor ops.
    Returns normalised float images [B, 1, 28, 28].
    """
    b = idx.numel()
    size = images_padded.shape[-1] - 2 * PAD
    oy = torch.randint(0, 2 * PAD + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * PAD + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    ar = torch.arange(size)
    rows = (oy[:, None] + ar)[:, :, None]  # [B, 28, 1]
    cols = ox[:, None] + ar  # [B, 28]
    # flipping = reading the columns of the crop window right-to-left
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]  # [B, 1, 28]
    crops = images_padded[idx[:, None, None], rows, cols]  # [B, 28, 28]
    return tb.normalize_images(crops)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Independent, reproducible RNG stream for one epoch's order and augmentation."""
    g = torch.Generator()
    g.manual_seed(seed * 100_003 + epoch)
    return g


@torch.no_grad()
def evaluate(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int, dtype=None) -> float:
    """Top-1 accuracy (%) on uint8 ``images``; ``dtype`` = autocast dtype or None for fp32."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        x = tb.normalize_images(images[i:i + batch_size])
        with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(x)
        correct += (logits.argmax(-1) == labels[i:i + batch_size]).sum().item()
    model.train(was_training)
    return 100.0 * correct / images.shape[0]


class ThreadGovernor:
    """Chooses between 1 and ``max_threads`` intra-op threads from the load of other processes.

    After each step, once ``window_s`` seconds have passed since the last check, it compares
    machine-wide busy CPU time (/proc/stat) with this process's own CPU time (``os.times``)
    over the window since the last check; the difference is what other processes used. More
    than ``threshold`` cores of that means a thread of ours would share a core, and with
    OpenMP barriers one slow thread stalls all.
    """

    def __init__(self, max_threads: int, enabled: bool, window_s: float = 3.0, threshold: float = 0.5):
        self.max_threads, self.window_s, self.threshold = max_threads, window_s, threshold
        self.enabled = enabled and max_threads > 1 and os.path.exists('/proc/stat')
        self.threads = max_threads
        self.steps_at = {}  # thread count -> number of steps run with it
        self.tick = os.sysconf('SC_CLK_TCK') if self.enabled else 1
        self._last = self._sample() if self.enabled else None
        torch.set_num_threads(self.threads)

    def _sample(self):
        with open('/proc/stat') as f:
            vals = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        busy = (sum(vals) - vals[3] - vals[4]) / self.tick
        t = os.times()
        return busy, t.user + t.system, time.monotonic()

    def step(self):
        self.steps_at[self.threads] = self.steps_at.get(self.threads, 0) + 1
        # a time window, not a step count: a contended 2-thread step can be ~6x slower
        if not self.enabled or time.monotonic() - self._last[2] < self.window_s:
            return
        busy, own, now = self._sample()
        others = ((busy - self._last[0]) - (own - self._last[1])) / max(1e-6, now - self._last[2])
        self._last = (busy, own, now)
        want = 1 if others > self.threshold else self.max_threads
        if want != self.threads:
            self.threads = want
            torch.set_num_threads(want)
            log(f'other processes use {others:.2f} cores -> {want} thread(s)')


# ----------------------------------------------------------------------------------------------
# Schedule, checkpoints, export
# ----------------------------------------------------------------------------------------------

def lr_at(step: int, total_steps: int, args) -> float:
    """Linear warmup to ``args.lr`` then cosine decay to ``args.min_lr`` (per optimizer step)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    t = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1.0 + math.cos(math.pi * min(1.0, t)))


def atomic_torch_save(obj, path: Path):
    tmp = path.with_suffix(path.suffix + '.tmp')
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export_weights(model, out: Path, meta: dict):
    """Write eval-ready fp32 weights (safetensors) plus the JSON description next to them."""
    from safetensors.torch import save_file
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().contiguous().clone() if v.is_floating_point() else v.detach().contiguous().clone()
          for k, v in model.state_dict().items()}
    tmp = out.with_name(out.name + '.tmp')
    save_file(sd, str(tmp), metadata={'format': 'pt', 'model': meta['model']})
    os.replace(tmp, out)
    os.chmod(out, 0o644)  # safetensors writes 0600; the file ships in the package
    size_mb = out.stat().st_size / 2**20
    if size_mb > 10:
        raise RuntimeError(f'{out} is {size_mb:.1f} MB, over the 10 MB budget')
    json_path = out.with_suffix('.json')
    tmp = json_path.with_name(json_path.name + '.tmp')
    tmp.write_text(json.dumps(meta, indent=2) + '\n')
    os.replace(tmp, json_path)


def fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f'{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}'


def log(msg: str):
    print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    amp_dtype = torch.bfloat16 if args.precision == 'bf16' else None
    command = ' '.join(shlex.quote(a) for a in ['python', '-m', 'tokenprune.eval.train_testbed',
                                                *(sys.argv[1:] if argv is None else argv)])
    spec = tb.TESTBEDS[args.model]
    out = Path(args.out or spec.weights_path)
    ckpt_dir = Path(args.ckpt_dir or f'runs/{args.model}')
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = ckpt_dir / 'last.pt'

    # --- data: uint8 in memory (60k x 32 x 32 = 61 MB padded) ---
    if args.val_split:
        train_x, train_y = tb.testbed_split('fmnist', 'train', args.data_root)  # garments; mosaics: composed below
        val_x, val_y = tb.testbed_split(spec.task, 'val', args.data_root)
    else:
        train_x, train_y = tb.load_fashion_mnist('train', args.data_root)
    test_x, test_y = tb.testbed_split(spec.task, 'test', args.data_root)
    train_x_padded = F.pad(train_x, (PAD, PAD, PAD, PAD))  # zero = black background, as in the data
    n_train = train_x.shape[0]

    def batch(idx, gen):
        if spec.task == 'mosaic':  # the garments are not cropped: the frame must stay whole
            images, labels = tb.make_mosaics(train_x, train_y, idx, gen, flip=True)
            return tb.normalize_images(images), labels
        return augment_batch(train_x_padded, idx, gen), train_y[idx]
    steps_per_epoch = n_train // args.batch_size  # drop the ragged last batch: constant batch size
    total_steps = steps_per_epoch * args.epochs

    # --- model / optimizer ---
    model = timm.create_model(args.model, pretrained=False, drop_path_rate=args.drop_path)
    n_params = sum(p.numel() for p in model.parameters())
    # no weight decay on biases, norms, pos_embed and cls_token (timm's no_weight_decay list)
    groups = param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=model.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), fused=True)

    start_epoch, start_step_in_epoch, global_step = 0, 0, 0
    elapsed_before = 0.0  # training wall time of previous (resumed) sessions
    history = []
    gen_state = None
    if args.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location='cpu', weights_only=False)
        if ck['args']['batch_size'] != args.batch_size or ck['args']['epochs'] != args.epochs:
            raise SystemExit('resume: --batch-size/--epochs differ from the checkpoint; refusing')
        model.load_state_dict(ck['model'])
        optimizer.load_state_dict(ck['optimizer'])
        start_epoch, start_step_in_epoch = ck['epoch'], ck['step_in_epoch']
        global_step, elapsed_before, history = ck['global_step'], ck['elapsed'], ck['history']
        gen_state = ck['gen_state']
        torch.set_rng_state(ck['torch_rng'])
        log(f'resumed from {ckpt_path}: epoch {start_epoch} step {start_step_in_epoch} (global {global_step})')

    log(f'{args.model} {spec.args} | {n_params / 1e6:.2f}M params | '
        f'{args.epochs} epochs x {steps_per_epoch} steps of {args.batch_size} | '
        f'precision {args.precision} | threads {args.threads} | torch {torch.__version__} timm {timm.__version__}')

    def meta(test_top1, test_top1_bf16, epochs_done, complete, val_top1=None):
        return {
            'model': args.model,
            'summary': spec.summary,
            'config': spec.args,
            'task': spec.task,
            'params': n_params,
            'data': f'Fashion-MNIST (Zalando, MIT); train {n_train} / validation '
                    f'{len(val_y) if args.val_split else 0} (the last training images) / test {len(test_y)}',
            'val_top1': val_top1,
            'epochs': epochs_done,
            'epochs_planned': args.epochs,
            'complete': complete,
            'test_top1': test_top1,
            'test_top1_note': 'fp32 eval of the saved weights' if test_top1 is not None else None,
            'test_top1_bf16': test_top1_bf16,
            'train_hparams': {k: v for k, v in vars(args).items() if k not in ('out', 'ckpt_dir', 'resume')},
            'training_command': command,
            'steps_by_thread_count': {str(k): v for k, v in sorted(governor.steps_at.items())},
            'wall_time_s': round(elapsed_before + (time.time() - t_start), 1),
            'history': history,
            'torch': torch.__version__,
            'timm': timm.__version__,
            'machine': f'{platform.machine()} {platform.processor() or ""}'.strip(),
        }

    def save_checkpoint(epoch, step_in_epoch, gen):
        atomic_torch_save({
            'model': model.state_dict(),
            'optimizer': optimizer.state_dict(),
            'epoch': epoch,
            'step_in_epoch': step_in_epoch,
            'global_step': global_step,
            'gen_state': gen.get_state() if gen is not None else None,
            'torch_rng': torch.get_rng_state(),
            'elapsed': elapsed_before + (time.time() - t_start),
            'history': history,
            'args': vars(args),
        }, ckpt_path)

    governor = ThreadGovernor(args.threads, args.adaptive_threads)
    t_start = time.time()
    last_ckpt_time = t_start
    steps_this_session = 0
    model.train()
    for epoch in range(start_epoch, args.epochs):
        gen = epoch_generator(args.seed, epoch)
        order = torch.randperm(n_train, generator=gen)
        first = 0
        if epoch == start_epoch and start_step_in_epoch > 0:
            first = start_step_in_epoch
            gen.set_state(gen_state)  # augmentation stream continues where the checkpoint left it
        loss_sum, loss_n, t_log = 0.0, 0, time.time()
        for s in range(first, steps_per_epoch):
            idx = order[s * args.batch_size:(s + 1) * args.batch_size]
            x, y = batch(idx, gen)
            lr = lr_at(global_step, total_steps, args)
            for g in optimizer.param_groups:
                g['lr'] = lr
            with torch.autocast('cpu', dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f'non-finite loss at step {global_step}')
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            governor.step()
            global_step += 1
            steps_this_session += 1
            loss_sum += loss.item()
            loss_n += 1

            if global_step % args.log_every == 0 or s == steps_per_epoch - 1:
                now = time.time()
                ips = loss_n * args.batch_size / max(1e-9, now - t_log)
                session_rate = steps_this_session / max(1e-9, now - t_start)  # steps/s incl. evals
                eta = (total_steps - global_step) / session_rate
                log(f'ep {epoch + 1}/{args.epochs} step {s + 1}/{steps_per_epoch} (global {global_step}/{total_steps}) '
                    f'loss {loss_sum / loss_n:.4f} lr {lr:.2e} | {ips:.1f} img/s {governor.threads}T | '
                    f'elapsed {fmt_time(elapsed_before + now - t_start)} ETA {fmt_time(eta)}')
                loss_sum, loss_n, t_log = 0.0, 0, time.time()

            if time.time() - last_ckpt_time > args.ckpt_minutes * 60 and s + 1 < steps_per_epoch:
                save_checkpoint(epoch, s + 1, gen)
                last_ckpt_time = time.time()
                log(f'checkpoint (mid-epoch) -> {ckpt_path}')
            if args.max_steps and steps_this_session >= args.max_steps:
                log(f'--max-steps {args.max_steps} reached; stopping without export')
                return

        # --- end of epoch: evaluate, checkpoint, export ---
        t_eval = time.time()
        eval_split = 'val' if args.val_split else 'test'
        acc = evaluate(model, *((val_x, val_y) if args.val_split else (test_x, test_y)), args.eval_batch_size,
                       amp_dtype)
        history.append({'epoch': epoch + 1, f'{eval_split}_top1_bf16' if amp_dtype else f'{eval_split}_top1': acc,
                        'wall_s': round(elapsed_before + time.time() - t_start, 1)})
        log(f'=== epoch {epoch + 1}/{args.epochs}: {eval_split} top-1 {acc:.2f}% '
            f'({args.precision} eval, {time.time() - t_eval:.0f}s) ===')
        save_checkpoint(epoch + 1, 0, None)
        last_ckpt_time = time.time()
        complete = epoch + 1 == args.epochs
        if not complete:
            export_weights(model, out, meta(None, None, epoch + 1, False, val_top1=acc if args.val_split else None))
            log(f'exported weights -> {out}')

    # --- final: fp32 evaluation of exactly what is saved ---
    acc32 = evaluate(model, test_x, test_y, args.eval_batch_size, None)
    val32 = evaluate(model, val_x, val_y, args.eval_batch_size, None) if args.val_split else None
    acc_bf16 = evaluate(model, test_x, test_y, args.eval_batch_size, amp_dtype) if amp_dtype else None
    log(f'final test top-1 (fp32): {acc32:.2f}%' + (f', validation {val32:.2f}%' if val32 is not None else ''))
    export_weights(model, out, meta(acc32, acc_bf16, args.epochs, True, val_top1=val32))
    log(f'exported weights -> {out} ({out.stat().st_size / 2**20:.2f} MB) and {out.with_suffix(".json")}')


if __name__ == '__main__':
    main()
