"""Pictures of clusters: one contact-sheet PNG per cluster (the images nearest its centroid, nearest
first) and one index.html that links them with each cluster's size, written into an output
transaction's staging folder by itae-cluster."""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from .collection import Limits, load_image
from .errors import DataError

SHEET_NAME = "cluster-{:05d}.png"


def contact_sheet(images: list, thumb: int, columns: int | None = None):
    """A grid of square thumbnails (centre crops) on a grey ground; None entries stay grey."""
    from PIL import Image, ImageOps

    n = max(1, len(images))
    cols = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    pad = 2
    sheet = Image.new("RGB", (cols * (thumb + pad) + pad, rows * (thumb + pad) + pad), (96, 96, 96))
    for i, img in enumerate(images):
        if img is None:
            continue
        tile = ImageOps.fit(img.convert("RGB"), (thumb, thumb))
        sheet.paste(tile, (pad + (i % cols) * (thumb + pad), pad + (i // cols) * (thumb + pad)))
    return sheet


def write_sheets(staging: Path, source: dict, nearest: dict[int, list[tuple[int, str]]], thumb: int,
                 limits: Limits | None = None, progress: bool = True) -> dict[int, str]:
    """cluster -> file name of its contact sheet, drawn into `staging`. An image that can no longer be
    read (moved since itae-embed) leaves its tile grey."""
    from tqdm import tqdm

    limits = limits or Limits(root=source["location"] if source["kind"] == "folder" else None)
    names = {}
    for c in tqdm(sorted(nearest), desc="contact sheets", unit="sheet", disable=not progress, leave=False):
        images = []
        for index, key in nearest[c]:
            try:
                images.append(load_image(source["kind"], source["location"], source.get("column"), index, key,
                                         limits))
            except DataError:
                images.append(None)
        names[c] = SHEET_NAME.format(c)
        contact_sheet(images, thumb).save(staging / names[c], format="PNG")
    return names


def _metrics_html(metrics: dict | None, compare: dict | None) -> str:
    parts = []
    if metrics:
        parts.append(f"<p>Against the labels ({html.escape(metrics['labels'])}, {metrics['labelled']} images): "
                     f"ACC {100 * metrics['acc']:.2f}%, NMI {100 * metrics['nmi']:.2f}%, "
                     f"ARI {100 * metrics['ari']:.2f}%.</p>")
    if compare:
        parts.append(f"<p>Agreement with {html.escape(compare['other'])} ({compare['common']} common images): "
                     f"ARI {compare['ari']:.4f}.</p>")
    return "\n".join(parts)


def index_html(title: str, sizes: np.ndarray, sheets: dict[int, str], info: dict) -> str:
    """The gallery page: clusters largest first, each its sheet (linked) and size."""
    order = np.argsort(-np.asarray(sizes), kind="stable")
    cards = []
    for c in order.tolist():
        name = sheets.get(c)
        img = (f'<a href="{html.escape(name)}"><img src="{html.escape(name)}" alt="cluster {c}" loading="lazy"></a>'
               if name else '<div class="empty">no images</div>')
        cards.append(f'<figure id="c{c}">{img}<figcaption>cluster {c}: {int(sizes[c])} '
                     f'image{"" if sizes[c] == 1 else "s"}</figcaption></figure>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; background: #fafafa; color: #222; }}
main {{ display: flex; flex-wrap: wrap; gap: 14px; }}
figure {{ margin: 0; background: #fff; padding: 6px; border: 1px solid #ddd; }}
figure img {{ display: block; width: 260px; height: auto; }}
figcaption {{ font-size: 14px; padding-top: 4px; }}
.empty {{ width: 260px; height: 60px; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{info['images']} images in {len(sizes)} clusters ({html.escape(info['method'])}); each sheet shows the images
nearest the cluster's centroid, nearest first.</p>
{_metrics_html(info.get('metrics'), info.get('compare'))}
<main>
{chr(10).join(cards)}
</main>
</body></html>
"""
