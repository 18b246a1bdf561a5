"""Figures of the study report: PNG data URIs, image grids and figure cards (no pyplot: no global state)."""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import numpy as np


def escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


def png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def figure(b64: str, alt: str, caption: str, title: str = "", pixels: bool = False) -> str:
    """A card with a PNG (base64) and its caption (HTML); ``pixels``: drawn without smoothing."""
    img = (f'<img src="data:image/png;base64,{b64}" alt="{escape(alt)}" title="{escape(title or alt)}"'
           + (' class="pixels"' if pixels else "") + ">")
    return f'<div class="card"><figure>{img}<figcaption>{caption}</figcaption></figure></div>'


def new_axes(width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot()


def dot(n: int) -> float:
    """Marker area that keeps a scatter of ``n`` points readable (smaller dots for more points)."""
    return float(np.clip(3000.0 / n, 1.0, 12.0))


def as_images(x: np.ndarray) -> np.ndarray | None:
    """(N, C, H, W) for image-shaped data, None for vectors."""
    return x[:, None] if x.ndim == 3 else x if x.ndim == 4 else None


def grid_png(images: np.ndarray, cols: int = 8) -> str:
    """Images (n, C, H, W) in [-1, 1] tiled row-major with 1-pixel gaps, enlarged to about 32 px each."""
    from matplotlib.image import imsave

    n, c, h, w = images.shape
    scale = max(1, 32 // max(h, w))
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    x = np.clip((images + 1.0) / 2.0, 0.0, 1.0).transpose(0, 2, 3, 1)
    x = x if c == 3 else x[..., :1]
    canvas = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1, x.shape[-1]))
    for k in range(n):
        r, q = divmod(k, cols)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = x[k]
    canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    gray = canvas.shape[-1] == 1  # (vmin and vmax do not apply to RGB)
    buf = io.BytesIO()
    imsave(buf, canvas[..., 0] if gray else canvas, cmap="gray" if gray else None, vmin=0.0, vmax=1.0, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")
