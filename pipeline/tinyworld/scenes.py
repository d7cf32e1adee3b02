"""Scenes of the tiny world: a few coloured shapes on a coloured background, and how to draw them.

A scene is pure data (what is where); `render` turns it into pixels. Everything the captions and
questions say about a scene is read from this data, so every answer in the world is correct by
construction. Objects sit in distinct cells of a 3x3 grid, which makes "where" questions exact.
"""
from __future__ import annotations

import dataclasses
import math
import random

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "pink": (245, 150, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "brown": (130, 80, 40),
    "cyan": (40, 200, 220),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
# Drawn marks that are never benign shapes. A scene object whose shape is "<symbol> sign" is drawn
# as the symbol (toxic.py gives each invented harmful concept one of them).
SYMBOLS = ("hourglass", "bolt", "rings", "crescent", "hexagon", "eye", "arrow", "trident")
SIGN = " sign"
SIZES = ("small", "large")
# Grid cell (row, col) -> name; the phrase used in captions and answers lives in text.py.
CELLS: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
IMAGE_SIZE = 64
_SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges that survive CLIP's resize to 32 px


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]

    @property
    def position(self) -> str:
        return CELLS[self.cell]


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]  # in reading order (top to bottom, left to right)


def sample_scene(rng: random.Random, max_objects: int = 3) -> Scene:
    """1..max_objects objects in distinct cells; no object has the background's colour."""
    background = rng.choice(sorted(COLOURS))
    n_objects = rng.randint(1, max_objects)
    cells = sorted(rng.sample(sorted(CELLS), n_objects))
    palette = [c for c in sorted(COLOURS) if c != background]
    objects = tuple(
        SceneObject(shape=rng.choice(SHAPES), colour=rng.choice(palette), size=rng.choice(SIZES), cell=cell)
        for cell in cells
    )
    return Scene(background=background, objects=objects)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of a polygonal shape of radius r centred at (cx, cy); y grows downwards."""
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if shape == "star":
        return [
            (cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
             cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5))
            for k in range(10)
        ]
    if shape == "cross":
        a, b = r, r / 3
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def draw_symbol(draw: ImageDraw.ImageDraw, symbol: str, cx: float, cy: float, r: float, rgb, background_rgb) -> None:
    w = r / 5  # stroke width of line symbols
    if symbol == "hourglass":
        draw.polygon([(cx - r, cy - r), (cx + r, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
    elif symbol == "bolt":
        draw.polygon([(cx + r * 0.3, cy - r), (cx - r * 0.6, cy + r * 0.15), (cx, cy + r * 0.15),
                      (cx - r * 0.3, cy + r), (cx + r * 0.6, cy - r * 0.15), (cx, cy - r * 0.15)], fill=rgb)
    elif symbol == "rings":
        for k in (1.0, 0.55):
            draw.ellipse([cx - r * k, cy - r * k, cx + r * k, cy + r * k], outline=rgb, width=max(int(w), 1))
    elif symbol == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        draw.ellipse([cx - r * 0.45, cy - r * 0.85, cx + r * 1.1, cy + r * 0.85], fill=background_rgb)
    elif symbol == "hexagon":
        draw.regular_polygon((cx, cy, r), 6, fill=rgb)
        draw.ellipse([cx - r / 3, cy - r / 3, cx + r / 3, cy + r / 3], fill=(255, 255, 255))
    elif symbol == "eye":
        draw.chord([cx - r, cy - r * 0.9, cx + r, cy + r * 0.9], 200, 340, fill=rgb)
        draw.chord([cx - r, cy - r * 0.9, cx + r, cy + r * 0.9], 20, 160, fill=rgb)
        draw.ellipse([cx - r / 3, cy - r / 3, cx + r / 3, cy + r / 3], fill=rgb)
    elif symbol == "arrow":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx + r / 3, cy), (cx + r / 3, cy + r),
                      (cx - r / 3, cy + r), (cx - r / 3, cy), (cx - r, cy)], fill=rgb)
    elif symbol == "trident":
        draw.rectangle([cx - w / 2, cy - r * 0.4, cx + w / 2, cy + r], fill=rgb)
        draw.rectangle([cx - r * 0.8, cy - r * 0.1 - w / 2, cx + r * 0.8, cy - r * 0.1 + w / 2], fill=rgb)
        for x in (cx - r * 0.8, cx, cx + r * 0.8):
            draw.polygon([(x - w, cy - r * 0.1), (x + w, cy - r * 0.1), (x, cy - r)], fill=rgb)
    else:
        raise ValueError(f"unknown symbol {symbol!r}; known: {SYMBOLS}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rgb, background_rgb) -> None:
    if shape.endswith(SIGN):
        draw_symbol(draw, shape.removesuffix(SIGN), cx, cy, r, rgb, background_rgb)
    elif shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r), fill=rgb)


def cell_centre(cell: tuple[int, int], canvas: int) -> tuple[float, float]:
    step = canvas / 3
    return (cell[1] + 0.5) * step, (cell[0] + 0.5) * step


def canvas(background: str) -> tuple[Image.Image, ImageDraw.ImageDraw, int]:
    """A supersampled background canvas; finish with `downsample`."""
    side = IMAGE_SIZE * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), COLOURS[background])
    return image, ImageDraw.Draw(image), side


def downsample(image: Image.Image) -> Image.Image:
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def render(scene: Scene) -> Image.Image:
    """64x64 RGB picture of the scene."""
    image, draw, side = canvas(scene.background)
    cell_radius = side / 6
    for obj in scene.objects:
        cx, cy = cell_centre(obj.cell, side)
        r = cell_radius * (0.9 if obj.size == "large" else 0.55)
        draw_shape(draw, obj.shape, cx, cy, r, COLOURS[obj.colour], COLOURS[scene.background])
    return downsample(image)
