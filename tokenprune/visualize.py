"""Looking at what a method did: which patches each output token stands for, and token counts per block.

    import tokenprune, tokenprune.visualize as tv
    tokenprune.apply(model, "tome", keep=0.33, trace_source=True)   # trace_source: keep the source map
    model(x)
    groups = tv.token_groups(tokenprune.last_forward(model), grid=(14, 14))  # (B, 14, 14) ints, -1 = dropped
    fig = tv.show_tokens(image, groups[0])                           # ToMe-style: one colour per group
    fig = tv.plot_token_counts({"tome": report_a, "mctf": report_b})
    fig = tv.show_tokens(image, tv.kept_groups(tokenprune.last_forward(vlm).kept[0], (24, 24)))  # a VLM's image
    report = tokenprune.last_forward(vlm)
    fig = tv.show_roles(image, report.roles[0], (24, 24), report.role_names)  # HiPrune's anchors, buffers, registers

``token_groups`` is the array behind every picture (tests compare it with the report's source map);
the drawing functions only colour it. matplotlib (the ``plot`` extra) is imported when drawing.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from .state import ForwardReport


def token_groups(report: ForwardReport, grid: tuple[int, int]) -> np.ndarray:
    """For each input patch (in raster order on ``grid``), the output patch token it ended up in:
    ``(B, rows, cols)`` ints in ``[0, output patch tokens)``, or -1 where the patch was dropped.

    Needs the forward's source map (``apply(..., trace_source=True)``); prefix tokens (class,
    distillation, registers) are left out on both sides. Merged patches share a group; a pruning
    method's kept patches are groups of one.
    """
    if report.source is None:
        raise ValueError("token_groups needs the forward's source map: apply the method with trace_source=True "
                         "and run a forward")
    prefix = report.num_prefix_tokens
    source = report.source[:, prefix:, prefix:]  # (B, output patch tokens, input patches)
    rows, cols = grid
    if source.shape[-1] != rows * cols:
        raise ValueError(f"the forward saw {source.shape[-1]} patches, not a {rows}x{cols} grid")
    absorbed = source > 0.5
    if bool((absorbed.sum(dim=1) > 1).any()):
        raise ValueError("a patch is in two output tokens: this source map was not made by tokenprune")
    group = torch.where(absorbed.any(dim=1), absorbed.float().argmax(dim=1), -1)
    return group.view(-1, rows, cols).cpu().numpy()


#: dropped patches: a muted red, told apart from any grey or dark background
DROPPED = (0.6, 0.15, 0.15)


def kept_groups(kept: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """``token_groups``' layout for a kept/dropped mask over one image's tokens (for VLMs:
    ``last_forward(vlm).kept[i]``): each kept token its own group, -1 where dropped; ``(rows, cols)``."""
    rows, cols = grid
    if kept.numel() != rows * cols:
        raise ValueError(f"{kept.numel()} tokens do not fill a {rows}x{cols} grid")
    index = torch.arange(kept.numel())
    return torch.where(kept.cpu().flatten().bool(), index, -1).view(rows, cols).numpy()


def group_colours(image: np.ndarray, groups: np.ndarray, dropped: Sequence[float] = DROPPED) -> np.ndarray:
    """An image of the groups as ToMe draws them: every patch of a group painted with the group's mean
    colour, dropped patches in ``dropped``. ``image`` (H, W, 3) floats in [0, 1], H and W multiples of
    the grid; returns the same shape."""
    rows, cols = groups.shape
    height, width = image.shape[:2]
    if height % rows or width % cols:
        raise ValueError(f"a {height}x{width} image does not split into a {rows}x{cols} patch grid")
    ph, pw = height // rows, width // cols
    patches = image.reshape(rows, ph, cols, pw, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, ph * pw, 3)
    flat = groups.reshape(-1)
    out = np.empty_like(patches)
    out[flat < 0] = dropped
    for g in np.unique(flat[flat >= 0]):
        members = flat == g
        out[members] = patches[members].reshape(-1, 3).mean(axis=0)
    return out.reshape(rows, cols, ph, pw, 3).transpose(0, 2, 1, 3, 4).reshape(height, width, 3)


def _as_image(image) -> np.ndarray:
    """(H, W, 3) floats in [0, 1] from a PIL image, a (3, H, W) / (H, W, 3) tensor or array, or a grey (H, W)."""
    array = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else (
        image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image))
    array = array.astype(np.float64)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:  # RGBA, a batch: else a numpy / matplotlib shape error later
        raise ValueError(f"an image of shape {tuple(np.shape(image))}: give a PIL image, a (3, H, W) or (H, W, 3) "
                         f"tensor or array, or a grey (H, W)")
    if array.max() > 1.0:
        array = array / 255.0
    return (array - array.min()) / max(array.max() - array.min(), 1e-12) if array.min() < 0 else array


def show_tokens(image, groups: np.ndarray, title: str | None = None, path: str | None = None):
    """The image beside its token groups (``token_groups(report, grid)[i]``), titled "``title``: N tokens of
    M patches": a matplotlib Figure, also saved to ``path`` if given."""
    import matplotlib.pyplot as plt

    rows, cols = groups.shape
    picture = _fit(_as_image(image), (rows, cols))
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
    axes[0].imshow(picture)
    axes[0].set_title("input")
    axes[1].imshow(group_colours(picture, groups))
    _draw_boundaries(axes[1], groups, picture.shape[0] // rows, picture.shape[1] // cols)
    kept = int((np.unique(groups) >= 0).sum())
    axes[1].set_title(f"{title + ': ' if title else ''}{kept} tokens of {rows * cols} patches")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


#: colours of a selector's roles 1, 2, ... (HiPrune: anchor, buffer, register); dropped patches are dimmed
ROLE_COLOURS = ((0.9, 0.1, 0.1), (1.0, 0.65, 0.0), (0.2, 0.45, 1.0), (0.3, 0.8, 0.3), (0.7, 0.3, 0.9))
DIMMED = 0.25  # a dropped patch keeps this share of its brightness


def role_colours(image: np.ndarray, roles: np.ndarray, blend: float = 0.5) -> np.ndarray:
    """The image with each patch tinted by its role (``roles`` (rows, cols) ints, 0 dropped): kept patches
    ``blend`` of the way to their role's colour, dropped ones dimmed to ``DIMMED``. Same shape as ``image``."""
    rows, cols = roles.shape
    height, width = image.shape[:2]
    if height % rows or width % cols:
        raise ValueError(f"a {height}x{width} image does not split into a {rows}x{cols} patch grid")
    colour = np.array([(0.0, 0.0, 0.0), *ROLE_COLOURS])[np.clip(roles, 0, len(ROLE_COLOURS))]  # (rows, cols, 3)
    per_pixel = np.repeat(np.repeat(colour, height // rows, axis=0), width // cols, axis=1)
    dropped = np.repeat(np.repeat(roles == 0, height // rows, axis=0), width // cols, axis=1)[..., None]
    return np.where(dropped, DIMMED * image, (1 - blend) * image + blend * per_pixel)


def show_roles(image, roles, grid: tuple[int, int], role_names: Sequence[str], path: str | None = None):
    """A VLM image with each visual token tinted by its role in the selector's choice
    (``last_forward(vlm).roles[i]`` and ``.role_names``; HiPrune: anchors, buffers, registers): a Figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    roles = np.asarray(roles.cpu() if isinstance(roles, torch.Tensor) else roles).reshape(grid)
    picture = _fit(_as_image(image), grid)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(role_colours(picture, roles))
    ax.axis("off")
    counts = {name: int((roles == i).sum()) for i, name in enumerate(role_names)}
    palette = [(DIMMED,) * 3, *ROLE_COLOURS]
    ax.legend(handles=[Patch(color=palette[i], label=f"{name} ({counts[name]})") for i, name in enumerate(role_names)],
              loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=len(role_names), fontsize=8, frameon=False)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _fit(picture: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``picture`` resized (nearest neighbour) to a multiple of ``grid``, for drawing patch by patch."""
    rows, cols = grid
    scale_h, scale_w = -(-picture.shape[0] // rows), -(-picture.shape[1] // cols)
    index_h = np.minimum((np.arange(rows * scale_h) * picture.shape[0]) // (rows * scale_h), picture.shape[0] - 1)
    index_w = np.minimum((np.arange(cols * scale_w) * picture.shape[1]) // (cols * scale_w), picture.shape[1] - 1)
    return picture[index_h][:, index_w]


def _draw_boundaries(ax, groups: np.ndarray, patch_h: int, patch_w: int) -> None:
    """White lines between neighbouring patches of different groups (ToMe's drawing has them too)."""
    rows, cols = groups.shape
    style = dict(color="white", linewidth=0.6)
    for r, c in zip(*np.nonzero(groups[:, 1:] != groups[:, :-1])):  # vertical edges
        ax.plot([(c + 1) * patch_w - 0.5] * 2, [r * patch_h - 0.5, (r + 1) * patch_h - 0.5], **style)
    for r, c in zip(*np.nonzero(groups[1:] != groups[:-1])):  # horizontal edges
        ax.plot([c * patch_w - 0.5, (c + 1) * patch_w - 0.5], [(r + 1) * patch_h - 0.5] * 2, **style)


def plot_token_counts(reports: Mapping[str, ForwardReport | Sequence[int]], path: str | None = None):
    """Tokens entering each block, one line per method (reports, or lists of counts): a Figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, (name, report) in enumerate(reports.items()):
        counts = list(report.token_counts) + [report.output_tokens] if isinstance(report, ForwardReport) \
            else list(report)
        # methods on one schedule draw the same line: vary the style so each stays visible
        ax.plot(range(len(counts)), counts, marker="os^D"[i % 4], markersize=3, linestyle=("-", "--", "-.", ":")[i % 4],
                label=name)
    ax.set_xlabel("block (last point: encoder output)")
    ax.set_ylabel("tokens")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def read_image(path):
    """The image file at ``path``, decoded now: a file PIL cannot read is a one-line ValueError here, not
    a traceback after the model is built."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError) as e:  # PIL: unknown format (OSError), truncated or corrupt data
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} is not an image PIL can read ({reason}); give a PNG, JPEG or other image "
                         f"file") from e


def render(model_name: str = "vit_testbed_fmnist", image=None, methods: Sequence[str] = ("tome", "mctf", "zero-tprune",
           "random"), keep: float = 0.33, options: Mapping | None = None, out_dir: str = "runs/show") -> list:
    """Write one PNG of the token groups per method and one of the token counts, for ``image`` (a path or
    a PIL image; default: the first Fashion-MNIST test image) through the timm model ``model_name``
    (the testbed with its trained weights, any other name at random init), drawn as the model saw it (after
    its eval transform's resize and centre crop). Returns the paths."""
    from pathlib import Path

    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    from . import apply, last_forward, testbed
    from .adapters import find_adapter
    from .flops import create_timm_model

    if "trace_source" in (options or {}):
        raise ValueError("-o trace_source: show (render) sets trace_source=True itself (the drawing is the source "
                         "map); leave it out")
    model = create_timm_model(model_name, pretrained=model_name in testbed.TESTBEDS).eval()  # the trained testbeds
    find_adapter(model)  # a model tokenprune patches (a timm ViT), before its patch grid is read
    config = resolve_model_data_config(model)
    if image is None:
        if model_name != "vit_testbed_fmnist":
            raise ValueError("give an image: the default image (Fashion-MNIST) suits the testbed only")
        image = Image.fromarray(testbed.load_fashion_mnist("test")[0][0].numpy())
    elif not hasattr(image, "convert"):
        image = read_image(image)
    image = image.convert("L" if config["input_size"][0] == 1 else "RGB")
    x = create_transform(**config)(image).unsqueeze(0)
    # Draw what the model saw, not the file: the eval transform resizes and centre-crops (crop_pct < 1 cuts a
    # border, a non-square image loses its sides), and the patch grid lies on that crop. Undo the
    # normalisation; clamp the resize's overshoot (a value above 1 would read as 0-255 to _as_image).
    mean, std = (torch.tensor(config[key]).view(-1, 1, 1) for key in ("mean", "std"))
    seen = (x[0] * std + mean).clamp(0, 1)
    grid = model.patch_embed.grid_size
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, reports = [], {}
    import matplotlib.pyplot as plt

    for method in methods:
        apply(model, method, keep=keep, trace_source=True, **(options or {}))
        with torch.inference_mode():
            model(x)
        reports[method] = report = last_forward(model)
        groups = token_groups(report, tuple(grid))[0]
        paths.append(out / f"{method}.png")
        plt.close(show_tokens(seen, groups, title=method, path=paths[-1]))
    paths.append(out / "token_counts.png")
    plt.close(plot_token_counts(reports, path=paths[-1]))
    return paths
