"""A small, self-trained DeiT-style ViT on Fashion-MNIST: the project's accuracy testbed.

No pretrained ImageNet weights are available offline, so token pruning methods are measured on
a ViT that the project trains itself (see ``tokenprune/eval/train_testbed.py``). The model is a
plain timm ``VisionTransformer`` -- class token, ``global_pool='token'``, the stock timm ``Block``
and ``Attention`` modules -- so every token-pruning patch applies to it exactly as to a DeiT.
The only non-standard part is the patch embedding: a small convolutional stem (early
convolutions train much faster than a linear patchify on small data) that turns a 28x28x1 image
into a 14x14 grid, i.e. 196 patch tokens plus the class token.

Importing this module registers ``vit_testbed_fmnist`` with timm::

    import timm, tokenprune.testbed
    model = timm.create_model('vit_testbed_fmnist', pretrained=True)  # packaged weights, offline

The pretrained config points at ``tokenprune/weights/vit_testbed_fmnist.safetensors`` through
timm's ``file=`` source, which never touches the network.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import to_2tuple
from timm.layers.format import Format, nchw_to
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

__all__ = [
    'TESTBEDS',
    'Testbed',
    'VAL_SIZE',
    'make_mosaics',
    'testbed_split',
    'ConvStemPatchEmbed',
    'FMNIST_MEAN',
    'FMNIST_STD',
    'FMNIST_CLASSES',
    'TESTBED_ARGS',
    'WEIGHTS_PATH',
    'DATA_DIR',
    'FMNIST_ROOT_ENV',
    'load_fashion_mnist',
    'normalize_images',
    'vit_testbed_fmnist',
]

_PKG_DIR = Path(__file__).resolve().parent
#: Packaged weights written by the training script (eval-ready fp32 state_dict).
WEIGHTS_PATH = _PKG_DIR / 'weights' / 'vit_testbed_fmnist.safetensors'
#: Packaged copy of the Fashion-MNIST *test* split (the train split is too large to ship).
DATA_DIR = _PKG_DIR / 'data'
#: Environment variable naming a folder with the full data set (train + test ``*-ubyte.gz``), used when
#: no ``root`` is given and the packaged copy lacks the split (no machine path is built in).
FMNIST_ROOT_ENV = 'TOKENPRUNE_FMNIST_ROOT'

# Per-pixel statistics of the 60k Fashion-MNIST training images, scaled to [0, 1].
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)
FMNIST_CLASSES = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
    'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot',
)

#: Architecture of ``vit_testbed_fmnist``. The training script imports this so the packaged
#: weights and the registered model can never disagree.
TESTBED_ARGS = dict(
    img_size=28,
    patch_size=2,  # overall stride of the conv stem: 28x28 -> 14x14 = 196 tokens
    in_chans=1,
    num_classes=10,
    embed_dim=96,
    depth=12,
    num_heads=3,
    mlp_ratio=4.0,
    class_token=True,
    global_pool='token',
)


class ConvStemPatchEmbed(nn.Module):
    """Convolutional stem used as a drop-in replacement for timm's ``PatchEmbed``.

    Layout: 3x3 conv (stride 1) + BN + GELU -> 3x3 conv (stride 2) + BN + GELU -> 1x1 projection
    to ``embed_dim``. The stem's total stride is 2, so ``patch_size`` must be 2: every output
    position of the 14x14 grid plays the role of a 2x2 "patch", and the attributes that timm's
    ``VisionTransformer`` reads (``num_patches``, ``grid_size``, ``patch_size``, ``img_size``,
    ``feat_ratio()``, ``dynamic_feat_size()``, ``flatten``/``output_fmt``) mean the same thing
    as in ``PatchEmbed``. BatchNorm uses its running statistics in eval mode, so inference does
    not depend on the batch composition (token pruning never touches the stem).

    The final projection is named ``proj`` (as in ``PatchEmbed``) so timm's
    ``pretrained_cfg['first_conv']`` conventions keep pointing at a conv layer.
    """

    #: Stride of the whole stem; the only supported patch size.
    STEM_STRIDE = 2

    def __init__(
            self,
            img_size: Optional[Union[int, Tuple[int, int]]] = 28,
            patch_size: Union[int, Tuple[int, int]] = 2,
            in_chans: int = 1,
            embed_dim: int = 128,
            norm_layer=None,
            flatten: bool = True,
            output_fmt: Optional[str] = None,
            bias: bool = True,
            strict_img_size: bool = True,
            dynamic_img_pad: bool = False,
            stem_chs: Tuple[int, int] = (32, 64),
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.patch_size = to_2tuple(patch_size)
        if self.patch_size != (self.STEM_STRIDE, self.STEM_STRIDE):
            raise ValueError(
                f'ConvStemPatchEmbed has a fixed stride of {self.STEM_STRIDE}; got patch_size={patch_size}')
        self.img_size, self.grid_size, self.num_patches = self._init_img_size(img_size)
        if output_fmt is not None:
            self.flatten = False
            self.output_fmt = Format(output_fmt)
        else:
            self.flatten = flatten
            self.output_fmt = Format.NCHW
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad

        c1, c2 = stem_chs
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, c1, kernel_size=3, stride=1, padding=1, bias=False, **dd),
            nn.BatchNorm2d(c1, **dd),
            nn.GELU(),
            nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1, bias=False, **dd),
            nn.BatchNorm2d(c2, **dd),
            nn.GELU(),
        )
        self.proj = nn.Conv2d(c2, embed_dim, kernel_size=1, bias=bias, **dd)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def _init_img_size(self, img_size):
        if img_size is None:
            return None, None, None
        img_size = to_2tuple(img_size)
        grid_size = tuple(s // p for s, p in zip(img_size, self.patch_size))
        return img_size, grid_size, grid_size[0] * grid_size[1]

    def set_input_size(self, img_size=None, patch_size=None):
        """Change the nominal input size (used by ``VisionTransformer.set_input_size``)."""
        if patch_size is not None and to_2tuple(patch_size) != self.patch_size:
            raise ValueError('ConvStemPatchEmbed cannot change its patch size (fixed conv stride)')
        if img_size is not None:
            self.img_size, self.grid_size, self.num_patches = self._init_img_size(img_size)

    def feat_ratio(self, as_scalar: bool = True):
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        # padding=1 convolutions with stride 2 give ceil(H / 2) outputs.
        return math.ceil(img_size[0] / self.patch_size[0]), math.ceil(img_size[1] / self.patch_size[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if self.img_size is not None and self.strict_img_size:
            if (H, W) != tuple(self.img_size):
                raise ValueError(f'Input size ({H}x{W}) does not match model ({self.img_size[0]}x{self.img_size[1]}).')
        x = self.proj(self.stem(x))
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # NCHW -> NLC
        elif self.output_fmt != Format.NCHW:
            x = nchw_to(x, self.output_fmt)
        return self.norm(x)


def _cfg(**kwargs):
    return {
        'url': '',
        'num_classes': 10,
        'input_size': (1, 28, 28),
        'pool_size': None,
        'crop_pct': 1.0,
        'interpolation': 'bilinear',
        'fixed_input_size': True,
        'mean': FMNIST_MEAN,
        'std': FMNIST_STD,
        'first_conv': 'patch_embed.stem.0',
        'classifier': 'head',
        'license': 'mit',
        **kwargs,
    }




@dataclass(frozen=True)
class Testbed:
    """One model of the testbed family: its architecture, its task, and where its weights live."""
    name: str
    #: ``VisionTransformer`` keyword arguments (the training script builds exactly this model).
    args: dict
    #: the convolutional stem (``ConvStemPatchEmbed``) instead of timm's linear ``PatchEmbed``
    conv_stem: bool
    #: ``'fmnist'``: one 28x28 garment; ``'mosaic'``: the marked garment of a 2x2 mosaic (``make_mosaics``)
    task: str
    summary: str

    @property
    def weights_path(self) -> Path:
        return _PKG_DIR / 'weights' / f'{self.name}.safetensors'

    @property
    def input_size(self) -> Tuple[int, int, int]:
        size = self.args['img_size']
        return (self.args['in_chans'], size, size)


_SMALL = dict(in_chans=1, num_classes=10, embed_dim=96, depth=8, num_heads=3, mlp_ratio=2.0)

#: The family, by timm name. Each differs from the first in one thing that token pruning sees: the
#: patch embedding, the head (class token or average pooling), or a task where only some tokens matter.
TESTBEDS = {t.name: t for t in (
    Testbed('vit_testbed_fmnist', TESTBED_ARGS, conv_stem=True, task='fmnist',
            summary='DeiT-style: conv stem, class token, 12 blocks, width 96 (196 + 1 tokens)'),
    Testbed('vit_testbed_fmnist_plain', dict(_SMALL, img_size=28, patch_size=2, class_token=True, global_pool='token'),
            conv_stem=False, task='fmnist',
            summary='plain linear patch embedding (patch 2), class token, 8 blocks, width 96, MLP ratio 2'),
    Testbed('vit_testbed_fmnist_gap', dict(_SMALL, img_size=28, patch_size=2, class_token=False, global_pool='avg'),
            conv_stem=True, task='fmnist',
            summary='no class token, average-pooled head (CLIP/SigLIP-style), conv stem, 8 blocks, width 96'),
    Testbed('vit_testbed_mosaic', dict(_SMALL, img_size=56, patch_size=4, class_token=True, global_pool='token'),
            conv_stem=False, task='mosaic',
            summary='2x2 Fashion-MNIST mosaic, label = the framed garment; plain patch 4, 196 + 1 tokens, 8 blocks'),
)}


default_cfgs = generate_default_cfgs({
    # `file=` makes timm load a local file (no hub / network access at all).
    f'{t.name}.tokenprune_fmnist': _cfg(
        file=str(t.weights_path), input_size=t.input_size,
        first_conv='patch_embed.stem.0' if t.conv_stem else 'patch_embed.proj')
    for t in TESTBEDS.values()
})


def _create_testbed(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    spec = TESTBEDS[variant]
    if pretrained:
        # timm would fail later with a less obvious message (or silently fall back to random
        # init for some sources); say exactly what is missing and how to produce it.
        overlay = kwargs.get('pretrained_cfg_overlay') or {}
        cfg = kwargs.get('pretrained_cfg') or {}
        file = overlay.get('file') or (cfg.get('file') if isinstance(cfg, dict) else None) or str(spec.weights_path)
        if not (overlay.get('state_dict') or os.path.isfile(file)):
            raise FileNotFoundError(
                f"Pretrained weights for '{variant}' not found at {file}. Train them with "
                f"`python -m tokenprune.eval.train_testbed --model {variant} --data-root FASHION_MNIST_FOLDER` "
                "or create the model with pretrained=False.")
    if spec.conv_stem:
        kwargs.setdefault('embed_layer', ConvStemPatchEmbed)
    return build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        # no checkpoint filter: the weights are saved in exactly this model's layout
        **dict(spec.args, **kwargs),
    )


@register_model
def vit_testbed_fmnist(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT-style ViT (depth 12, width 96, 3 heads, conv stem, 196+1 tokens) for Fashion-MNIST."""
    return _create_testbed('vit_testbed_fmnist', pretrained=pretrained, **kwargs)


@register_model
def vit_testbed_fmnist_plain(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Plain ViT (linear patch-2 embedding, depth 8, width 96, 196+1 tokens) for Fashion-MNIST."""
    return _create_testbed('vit_testbed_fmnist_plain', pretrained=pretrained, **kwargs)


@register_model
def vit_testbed_fmnist_gap(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT without a class token, average-pooled (conv stem, depth 8, width 96, 196 tokens)."""
    return _create_testbed('vit_testbed_fmnist_gap', pretrained=pretrained, **kwargs)


@register_model
def vit_testbed_mosaic(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Plain ViT (patch 4, depth 8, width 96, 196+1 tokens) for the 56x56 Fashion-MNIST mosaic task."""
    return _create_testbed('vit_testbed_mosaic', pretrained=pretrained, **kwargs)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}


def _read_idx(path: Path, expected_dims: int) -> torch.Tensor:
    """Read a gzipped IDX file of unsigned bytes (magic 0x00000801 / 0x00000803). A file that cannot be read
    is a ``ValueError`` (the CLI's one-line bad input), like one that reads but is not an IDX file."""
    try:
        with gzip.open(path, 'rb') as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # not gzip (BadGzipFile is an OSError), truncated, corrupt
        raise ValueError(f'{path}: not a readable gzip file ({e}); expected the original Fashion-MNIST '
                         f'{path.name}') from e
    if len(raw) < 4 + 4 * expected_dims:  # too short for the header
        raise ValueError(f'{path}: not a uint8 IDX file with {expected_dims} dims')
    zero, dtype_code, ndim = struct.unpack('>HBB', raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expected_dims:
        raise ValueError(f'{path}: not a uint8 IDX file with {expected_dims} dims')
    shape = struct.unpack(f'>{ndim}I', raw[4:4 + 4 * ndim])
    offset = 4 + 4 * ndim
    count = math.prod(shape)
    if len(raw) - offset != count:
        raise ValueError(f'{path}: expected {count} bytes of data, found {len(raw) - offset}')
    data = torch.frombuffer(bytearray(raw[offset:]), dtype=torch.uint8)
    return data.reshape(shape)


def load_fashion_mnist(split: str, root: Optional[Union[str, os.PathLike]] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Load a Fashion-MNIST split from the original IDX gz files.

    Args:
        split: ``'train'`` (60k) or ``'test'`` (10k).
        root: folder holding the ``*-ubyte.gz`` files. Default: the packaged copy
            (``tokenprune/data``, test split only) if it has the files, else the folder named by the
            environment variable ``TOKENPRUNE_FMNIST_ROOT``.

    Returns:
        ``(images, labels)``: uint8 tensor ``[N, 28, 28]`` and int64 tensor ``[N]``.

    Raises:
        ValueError: the files are missing or unreadable (bad input to the CLI: one line, exit 2), naming the
            folder (and ``TOKENPRUNE_FMNIST_ROOT`` when the folder came from it) and the files it must hold.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    img_name, lbl_name = _FILES[split]
    where = root
    if root is None:
        root = DATA_DIR if (DATA_DIR / img_name).is_file() else os.environ.get(FMNIST_ROOT_ENV)
        where = f'{FMNIST_ROOT_ENV}={root}'
    if not root:
        source = ' (the validation splits are carved from it)' if split == 'train' else ''
        raise ValueError(
            f'the Fashion-MNIST {split} split{source} is not packaged (only the test split is): set '
            f'{FMNIST_ROOT_ENV} (or pass train_testbed --data-root) to the folder holding {img_name} and {lbl_name}')
    root = Path(root)
    img_path, lbl_path = root / img_name, root / lbl_name
    missing = [p.name for p in (img_path, lbl_path) if not p.is_file()]
    if missing:
        found = 'no such folder' if not root.is_dir() else f'no {" or ".join(missing)} there'
        raise ValueError(f'{where}: {found}; expected the folder holding the Fashion-MNIST {split} files '
                         f'{img_name} and {lbl_name}')
    images = _read_idx(img_path, 3)
    labels = _read_idx(lbl_path, 1).long()
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f'{root}: {images.shape[0]} images but {labels.shape[0]} labels')
    return images, labels


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` (or ``[N, 1, 28, 28]``) -> normalised float ``[N, 1, 28, 28]``."""
    x = images.float().div_(255.0)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return (x - FMNIST_MEAN[0]) / FMNIST_STD[0]


# ----------------------------------------------------------------------------------------------
# Splits and the mosaic task
# ----------------------------------------------------------------------------------------------

#: The validation split is the last ``VAL_SIZE`` images of Fashion-MNIST *train*; the family's later
#: models train on the rest. (``vit_testbed_fmnist`` trained on all 60k: for it these images are
#: training data, which its 90.1% there against 89.2% on test shows barely matters for ranking.)
VAL_SIZE = 5000
MOSAIC_GRID = 2  # garments per side of the canvas
MOSAIC_FRAME = 2  # width in pixels of the frame that marks the garment to classify
#: Fixed composition of the evaluation mosaics, so that every run scores the same images.
MOSAIC_EVAL_SEED = 1234


def make_mosaics(images: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, gen: torch.Generator,
                 pool: Optional[torch.Tensor] = None, flip: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Compose 2x2 mosaics of 28x28 garments; the label is the garment inside the bright frame.

    Sample ``i`` puts ``images[targets[i]]`` in a random cell, framed, and three garments drawn from
    ``pool`` (indices into ``images``; default all) in the other cells. Only a quarter of the patch
    tokens carry the answer, so a pruning method must keep the right ones: random selection cannot.
    ``flip`` mirrors each garment at random (training augmentation). Returns uint8 ``[n, 56, 56]`` and
    the labels.
    """
    n, cells = targets.numel(), MOSAIC_GRID * MOSAIC_GRID
    pool = torch.arange(images.shape[0]) if pool is None else pool
    others = pool[torch.randint(0, pool.numel(), (n, cells - 1), generator=gen)]
    where = torch.randint(0, cells, (n,), generator=gen)
    slots = []
    for cell in range(cells):  # the target at `where`; the others fill the remaining cells in order
        other = others.gather(1, (cell - (where < cell).long()).clamp(max=cells - 2)[:, None])[:, 0]
        slots.append(torch.where(where == cell, targets, other))
    tiles = images[torch.stack(slots, 1)]  # [n, 4, 28, 28]
    if flip:
        mirrored = torch.rand(n, cells, generator=gen) < 0.5
        tiles = torch.where(mirrored[..., None, None], tiles.flip(-1), tiles)
    tiles = tiles.clone()
    framed = tiles[torch.arange(n), where]  # [n, 28, 28] copy
    f = MOSAIC_FRAME
    framed[:, :f], framed[:, -f:], framed[:, :, :f], framed[:, :, -f:] = 255, 255, 255, 255
    tiles[torch.arange(n), where] = framed
    side = images.shape[-1]
    canvas = tiles.view(n, MOSAIC_GRID, MOSAIC_GRID, side, side).permute(0, 1, 3, 2, 4)
    return canvas.reshape(n, MOSAIC_GRID * side, MOSAIC_GRID * side), labels[targets]


def testbed_split(task: str, split: str, root: Optional[Union[str, os.PathLike]] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and labels of a testbed task's split: ``train`` (Fashion-MNIST train less the
    validation images), ``val`` (its last ``VAL_SIZE``) or ``test`` (the 10k test split).

    Mosaic splits are composed once from their own split's garments with a fixed seed (train mosaics
    are composed afresh each epoch by the training script; here, one fixed draw)."""
    if task not in ('fmnist', 'mosaic'):
        raise ValueError(f"task must be 'fmnist' or 'mosaic', got {task!r}")
    if split not in ('train', 'val', 'test'):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    images, labels = load_fashion_mnist('test' if split == 'test' else 'train', root)
    if split == 'train':
        images, labels = images[:-VAL_SIZE], labels[:-VAL_SIZE]
    elif split == 'val':
        images, labels = images[-VAL_SIZE:], labels[-VAL_SIZE:]
    if task == 'fmnist':
        return images, labels
    gen = torch.Generator().manual_seed(MOSAIC_EVAL_SEED + ('train', 'val', 'test').index(split))
    return make_mosaics(images, labels, torch.arange(images.shape[0]), gen)
