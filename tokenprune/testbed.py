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
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import to_2tuple
from timm.layers.format import Format, nchw_to
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

__all__ = [
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


default_cfgs = generate_default_cfgs({
    # `file=` makes timm load a local file (no hub / network access at all).
    'vit_testbed_fmnist.tokenprune_fmnist': _cfg(file=str(WEIGHTS_PATH)),
})


def _create_testbed(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    if pretrained:
        # timm would fail later with a less obvious message (or silently fall back to random
        # init for some sources); say exactly what is missing and how to produce it.
        overlay = kwargs.get('pretrained_cfg_overlay') or {}
        cfg = kwargs.get('pretrained_cfg') or {}
        file = overlay.get('file') or (cfg.get('file') if isinstance(cfg, dict) else None) or str(WEIGHTS_PATH)
        if not (overlay.get('state_dict') or os.path.isfile(file)):
            raise FileNotFoundError(
                f"Pretrained weights for '{variant}' not found at {file}. Train them with "
                "`python -m tokenprune.eval.train_testbed --data-root FASHION_MNIST_FOLDER "
                f"--out {WEIGHTS_PATH}` or create the model with pretrained=False.")
    kwargs.setdefault('embed_layer', ConvStemPatchEmbed)
    return build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        # no checkpoint filter: the weights are saved in exactly this model's layout
        **kwargs,
    )


@register_model
def vit_testbed_fmnist(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT-style ViT (depth 12, width 96, 3 heads, conv stem, 196+1 tokens) for Fashion-MNIST."""
    model_args = dict(TESTBED_ARGS)
    return _create_testbed('vit_testbed_fmnist', pretrained=pretrained, **dict(model_args, **kwargs))


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}


def _read_idx(path: Path, expected_dims: int) -> torch.Tensor:
    """Read a gzipped IDX file of unsigned bytes (magic 0x00000801 / 0x00000803)."""
    with gzip.open(path, 'rb') as f:
        raw = f.read()
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
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    img_name, lbl_name = _FILES[split]
    if root is None:
        root = DATA_DIR if (DATA_DIR / img_name).is_file() else os.environ.get(FMNIST_ROOT_ENV)
    if not root:
        raise FileNotFoundError(
            f'the Fashion-MNIST {split} split is not packaged (only the test split is): pass its folder '
            f'(train_testbed --data-root) or set {FMNIST_ROOT_ENV} to the folder holding {img_name} and {lbl_name}')
    root = Path(root)
    img_path, lbl_path = root / img_name, root / lbl_name
    if not img_path.is_file() or not lbl_path.is_file():
        raise FileNotFoundError(f'Fashion-MNIST {split} files not found in {root} (need {img_name}, {lbl_name})')
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
