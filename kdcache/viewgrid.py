"""`kdcache views`: a PNG grid of a few samples' views as the teacher and the student see them.

Each row is one sample; each column group is one view, rendered at every requested size (e.g. the
teacher's 224 and the student's 32) by the one render path (`loader.iter_views`), from the view
table that `kdcache extract --recipe R --view-seed S` would store for this dataset. Smaller renders
are shown enlarged with nearest-neighbour pixels, so the student's resolution stays visible. The
label under each cell names the sample's class, and for a mixed view the partner's class and lambda.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class ViewGridConfig:
    dataset: str = "fashion-mnist"
    recipe: str = "ofa_vit"
    samples: int = 8
    views: int = 4
    sizes: tuple[int, ...] = (224, 32)
    view_seed: int = 0
    out: str = "views.png"
    cell: int = 0  # shown side of every render in pixels (0: the largest size)
    data_root: str | None = None
    download: bool = False
    subset: int | None = None


def pick_samples(labels: np.ndarray, count: int) -> np.ndarray:
    """`count` sample positions cycling through the classes (the first of class 0, of class 1, ...,
    then the second of each), so a small grid shows every class."""
    classes = np.unique(labels)
    per = {c: np.flatnonzero(labels == c) for c in classes}
    out = []
    for k in range(count):
        c = classes[k % len(classes)]
        pool = per[c]
        if k // len(classes) < len(pool):
            out.append(int(pool[k // len(classes)]))
    return np.asarray(out, dtype=np.int64)


def render_grid(cfg: ViewGridConfig) -> tuple[np.ndarray, list[list[str]]]:
    """(uint8 [rows, cols, cell, cell, 3] images, a caption per row and column): rows = samples,
    columns = views x sizes (view-major)."""
    import torch
    import torch.nn.functional as F

    from kdcache.data import get_recipe, load_dataset, view_table
    from kdcache.data.augment import COL
    from kdcache.data.loader import RenderSpec, iter_views
    from kdcache.errors import KDCacheError

    if cfg.samples < 1 or cfg.views < 1 or not cfg.sizes or min(cfg.sizes) < 8:
        raise KDCacheError(f"views: --samples {cfg.samples}, --views {cfg.views}, --sizes {cfg.sizes}",
                           expected="--samples >= 1, --views >= 1 and sizes >= 8, e.g. --sizes 224,32")
    recipe = get_recipe(cfg.recipe)
    ds = load_dataset(cfg.dataset, "train", root=cfg.data_root, download=cfg.download, subset=cfg.subset)
    views = recipe.default_views if recipe.enumerates else cfg.views
    _, table = view_table(recipe, cfg.view_seed, ds.keys, *ds.sizes(), views)
    table = table[:cfg.views]
    chosen = pick_samples(ds.labels, cfg.samples)
    cell = cfg.cell or max(cfg.sizes)
    specs = [RenderSpec(s, tuple(ds.mean), tuple(ds.std)) for s in cfg.sizes]
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    cols = []
    captions = [[] for _ in chosen]
    for v in range(len(table)):
        rows = table[v, chosen]
        (rendered, _), = list(iter_views(ds, chosen, rows, specs, len(chosen), torch.device("cpu")))
        for size, x in zip(cfg.sizes, rendered):
            px = (x * std + mean).clamp(0, 1)
            px = F.interpolate(px, size=(cell, cell), mode="nearest") if size != cell else px
            cols.append((px * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
            for r, (i, row) in enumerate(zip(chosen, rows)):
                text = f"v{v} {size}px {ds.class_names[ds.labels[i]]}"
                if len(row) > COL["mx_mode"] and row[COL["mx_mode"]] > 0:
                    kind = "mixup" if row[COL["mx_mode"]] == 1 else "cutmix"
                    mate = ds.class_names[ds.labels[int(row[COL["mx_partner"]])]]
                    text += f" + {mate} {kind} {row[COL['mx_lam']]:.2f}"
                captions[r].append(text)
    return np.stack(cols, axis=1), captions


def write_grid(cfg: ViewGridConfig) -> Path:
    """Render the grid and save it as a PNG at `cfg.out`; returns the path."""
    from PIL import Image, ImageDraw

    from kdcache.files import atomic_write

    images, captions = render_grid(cfg)
    rows, cols, cell = images.shape[:3]
    pad, text_h = 4, 14
    width, height = cols * (cell + pad) + pad, rows * (cell + text_h + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        for c in range(cols):
            x0, y0 = pad + c * (cell + pad), pad + r * (cell + text_h + pad)
            canvas.paste(Image.fromarray(images[r, c]), (x0, y0))
            draw.text((x0 + 1, y0 + cell + 1), _fit(draw, captions[r][c], cell), fill=(0, 0, 0))
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: canvas.save(tmp, format="PNG", optimize=True))
    return out


def _fit(draw, text: str, width: int) -> str:
    """The caption, shortened with '..' until it fits the cell."""
    while len(text) > 4 and draw.textlength(text) > width - 2:
        text = text[:-3] + ".."
    return text
