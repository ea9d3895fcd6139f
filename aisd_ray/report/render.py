"""Pictures people look at: palette masks, outlines over the image, side-by-side panels, and the
labelled gallery of the epoch-change images (truth and prediction contours on the slice)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OUTLINE = (255, 64, 64)
TRUTH = (64, 220, 64)  # green: the ground truth's outline
PREDICTION = (255, 64, 255)  # magenta: the prediction's outline


def palette_png(labels: np.ndarray, rgb_map) -> Image.Image:
    """A palette ("P") image whose indices are class ids and whose palette is ``rgb_map``."""
    im = Image.fromarray(labels.astype(np.uint8), "P")
    palette = [c for colour in rgb_map for c in colour]
    im.putpalette(palette + [0] * (768 - len(palette)))
    return im


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def outline(labels: np.ndarray) -> np.ndarray:
    """Boolean map of lesion pixels that touch a non-lesion pixel (4-neighbourhood)."""
    fg = labels > 0
    padded = np.pad(fg, 1, mode="edge")
    inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return fg & ~inner


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    out = _rgb(image).copy()
    out[outline(labels)] = OUTLINE
    return out


def heat(values: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8: ``values`` (H, W) in 0..1 as a heat map (matplotlib's "inferno": black 0,
    through red, to pale yellow 1), blended 70% over ``image`` (greyscale or RGB) where given."""
    from matplotlib import colormaps

    rgb = colormaps["inferno"](np.clip(np.asarray(values, np.float32), 0.0, 1.0))[..., :3] * 255.0
    if image is not None:
        rgb = 0.7 * rgb + 0.3 * _rgb(image).astype(np.float32)
    return rgb.astype(np.uint8)


def beside_heat(tile: np.ndarray, values: np.ndarray, gap: int = 4) -> np.ndarray:
    """``tile`` (H, W, 3) and, right of it after a black ``gap``, ``values`` (H, W) 0..1 as ``heat``
    over the tile's image: one (H, 2W + gap, 3) uint8 panel."""
    spacer = np.zeros((tile.shape[0], gap, 3), np.uint8)
    return np.concatenate([_rgb(tile), spacer, heat(values, tile)], axis=1)


def side_by_side(*panels: np.ndarray, gap: int = 4) -> Image.Image:
    """Panels of equal height joined left to right with a black gap."""
    rgb = [_rgb(p) for p in panels]
    h = rgb[0].shape[0]
    spacer = np.zeros((h, gap, 3), np.uint8)
    parts = []
    for i, p in enumerate(rgb):
        parts += ([spacer] if i else []) + [p]
    return Image.fromarray(np.concatenate(parts, axis=1))


def _thick(edge: np.ndarray, width: int) -> np.ndarray:
    out = edge.copy()
    for dy in range(-(width // 2), width - width // 2):
        for dx in range(-(width // 2), width - width // 2):
            out |= np.roll(np.roll(edge, dy, axis=0), dx, axis=1)
    return out


def contours(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, size: int = 256) -> np.ndarray:
    """The slice, scaled up to at least ``size`` px (bilinear), with the truth outlined in green
    and the prediction in magenta (both outlines drawn at the shown resolution, 2 px wide)."""
    rgb = _rgb(image)
    scale = max(1, -(-size // rgb.shape[0]))
    h, w = rgb.shape[0] * scale, rgb.shape[1] * scale
    shown = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR)).copy()
    for labels, colour in ((truth, TRUTH), (prediction, PREDICTION)):
        big = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((w, h), Image.NEAREST))
        shown[_thick(outline(big), 2)] = colour
    return shown


def gallery(tiles: list[tuple[str, np.ndarray]], title: str, columns: int = 3,
            legend: tuple[tuple[str, tuple[int, int, int]], ...] = (("truth", TRUTH), ("prediction", PREDICTION)),
            ) -> Image.Image:
    """Captioned tiles (caption, RGB array of one size) in a grid under a title line, with a
    colour legend at the top right."""
    font = ImageFont.load_default(size=14)
    th, tw = tiles[0][1].shape[:2]
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    head, caption, gap = 28, 20, 6
    sheet = Image.new("RGB", (columns * (tw + gap) + gap, head + rows * (th + caption + gap)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 6), title, fill=(255, 255, 255), font=font)
    font_width = sum(int(draw.textlength(text, font=font)) + 14 for text, _ in legend)
    x = sheet.width - max(190, font_width + gap)
    for text, colour in legend:
        draw.text((x, 6), text, fill=colour, font=font)
        x += int(draw.textlength(text, font=font)) + 14
    for k, (text, tile) in enumerate(tiles):
        x, y = gap + (k % columns) * (tw + gap), head + (k // columns) * (th + caption + gap)
        draw.text((x, y), text, fill=(230, 230, 230), font=font)
        sheet.paste(Image.fromarray(tile), (x, y + caption))
    return sheet


TP, FP, FN = (40, 200, 40), (230, 40, 40), (40, 120, 255)  # found, false alarm, missed


def error_map(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, size: int = 256) -> np.ndarray:
    """The slice scaled up to at least ``size`` px with lesion pixels tinted by outcome: true
    positives green, false positives red, false negatives blue (60% over the image)."""
    rgb = _rgb(image)
    scale = max(1, -(-size // rgb.shape[0]))
    h, w = rgb.shape[0] * scale, rgb.shape[1] * scale
    shown = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR)).astype(np.float32)
    t = np.asarray(Image.fromarray((truth > 0).astype(np.uint8)).resize((w, h), Image.NEAREST)) > 0
    p = np.asarray(Image.fromarray((prediction > 0).astype(np.uint8)).resize((w, h), Image.NEAREST)) > 0
    for mask, colour in ((t & p, TP), (~t & p, FP), (t & ~p, FN)):
        shown[mask] = 0.4 * shown[mask] + 0.6 * np.asarray(colour, np.float32)
    return shown.astype(np.uint8)


def error_panel(name: str, image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, caption: str
                ) -> Image.Image:
    """``error_map`` beside the plain slice, under a title with the legend and ``caption``."""
    font = ImageFont.load_default(size=14)
    tinted = error_map(image, truth, prediction)
    plain = np.asarray(Image.fromarray(_rgb(image)).resize(tinted.shape[1::-1], Image.BILINEAR))
    body = side_by_side(plain, tinted)
    sheet = Image.new("RGB", (body.width, body.height + 44), (24, 24, 24))
    sheet.paste(body, (0, 44))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), f"{name}  {caption}", fill=(235, 235, 235), font=font)
    x = 4
    for label, colour in (("found (TP)", TP), ("false (FP)", FP), ("missed (FN)", FN)):
        draw.text((x, 24), label, fill=colour, font=font)
        x += 100
    return sheet
