"""The toy world: a deterministic renderer of small scenes and their captions.

A scene is one to four copies of the same object (shape × colour × texture) on a background, drawn in
one of five domains:

- ``clean``: flat grey-ish background, the source domain;
- ``clean_v2``: clean rendering with a shifted sampling (smaller, more off-centre objects, a lighter and
  warmer background), an ImageNetV2-like natural shift;
- ``noisy``: clean scene plus colour/brightness/contrast jitter and Gaussian pixel noise;
- ``sketch``: grey outlines on white with faint pattern hatching, colour mostly lost;
- ``clutter``: busy background of random blocks and distractor strokes, a few strokes over the objects.

Everything is a pure function of the `random.Random` passed in: the same seed gives identical pixels
(numpy noise is drawn from a generator seeded from that rng). Images are drawn at twice the requested
size and box-reduced, which anti-aliases the shapes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond", "heart", "crescent")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 35),
    "purple": (135, 50, 175),
    "orange": (245, 135, 25),
    "white": (248, 248, 248),
    "cyan": (35, 210, 220),
}
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "checkered", "hollow")
COUNTS: tuple[int, ...] = (1, 2, 3, 4)
DOMAINS: tuple[str, ...] = ("clean", "noisy", "sketch", "clutter", "clean_v2")

COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
PLURALS = {shape: shape + "s" for shape in SHAPES} | {"cross": "crosses"}

_SUPERSAMPLE = 2


# --------------------------------------------------------------------------------------------------
# scenes


@dataclass(frozen=True)
class Scene:
    """What an image shows. Geometry (positions, sizes, pattern phase) is drawn at render time."""

    shape: str
    color: str
    texture: str
    count: int
    domain: str
    background: tuple[int, int, int]

    def __post_init__(self) -> None:
        for name, allowed in (("shape", SHAPES), ("color", tuple(COLORS)), ("texture", TEXTURES),
                              ("count", COUNTS), ("domain", DOMAINS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Scene.{name}={getattr(self, name)!r}; expected one of {allowed}")
        bg = self.background
        if len(bg) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in bg):
            raise ValueError(f"Scene.background={bg!r}; expected three ints in 0..255")


_SCENE_FIELDS = frozenset(f.name for f in fields(Scene))


def sample_background(rng: random.Random, domain: str) -> tuple[int, int, int]:
    """Background tone of a domain: grey with a slight tint; v2 lighter and warmer; sketch paper-white."""
    if domain == "sketch":
        level = rng.randint(240, 255)
        return (level, level, max(0, level - rng.randint(0, 8)))
    if domain == "clean_v2":
        level = rng.randint(125, 185)
        tint = (rng.randint(0, 18), rng.randint(-6, 8), rng.randint(-20, -2))
    else:
        level = rng.randint(80, 150)
        tint = (rng.randint(-12, 12), rng.randint(-12, 12), rng.randint(-12, 12))
    return tuple(min(255, max(0, level + t)) for t in tint)  # type: ignore[return-value]


def sample_scene(rng: random.Random, **fixed) -> Scene:
    """A uniformly random scene; keyword arguments (shape=, color=, texture=, count=, domain=,
    background=) fix attributes. The domain defaults to "clean" unless given."""
    unknown = set(fixed) - _SCENE_FIELDS
    if unknown:
        raise TypeError(f"sample_scene: unknown attribute(s) {sorted(unknown)}; known: {sorted(_SCENE_FIELDS)}")
    domain = fixed.get("domain", "clean")
    shape = fixed["shape"] if "shape" in fixed else rng.choice(SHAPES)
    color = fixed["color"] if "color" in fixed else rng.choice(tuple(COLORS))
    texture = fixed["texture"] if "texture" in fixed else rng.choice(TEXTURES)
    count = fixed["count"] if "count" in fixed else rng.choice(COUNTS)
    background = tuple(fixed["background"]) if "background" in fixed else sample_background(rng, domain)
    return Scene(shape=shape, color=color, texture=texture, count=count, domain=domain,
                 background=background)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# geometry


def _rotate(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float,
                fill: int = 255) -> None:
    """Filled silhouette of `shape` with circumradius about `r`, rotated by a small `angle`."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    if shape == "crescent":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        dx, dy = 0.55 * r * math.cos(angle - 0.6), 0.55 * r * math.sin(angle - 0.6)
        rr = 0.85 * r
        draw.ellipse((cx + dx - rr, cy + dy - rr, cx + dx + rr, cy + dy + rr), fill=0)
        return
    if shape == "heart":
        lobe = 0.5 * r
        pts = [(cx - r, cy - 0.25 * r), (cx + r, cy - 0.25 * r), (cx, cy + r)]
        draw.polygon(_rotate(pts, cx, cy, angle), fill=fill)
        for sx in (-1, 1):
            lx, ly = _rotate([(cx + sx * 0.5 * r, cy - 0.38 * r)], cx, cy, angle)[0]
            draw.ellipse((lx - lobe, ly - lobe, lx + lobe, ly + lobe), fill=fill)
        return
    if shape == "square":
        h = 0.78 * r
        pts = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    elif shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + 0.15 * r + r * math.sin(a))
               for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rad = r if k % 2 == 0 else 0.42 * r
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    elif shape == "cross":
        t = 0.32 * r
        pts = [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
               (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
               (cx - r, cy - t), (cx - t, cy - t)]
    elif shape == "diamond":
        pts = [(cx, cy - r), (cx + 0.62 * r, cy), (cx, cy + r), (cx - 0.62 * r, cy)]
    else:  # pragma: no cover - Scene validates shapes
        raise ValueError(shape)
    draw.polygon(_rotate(pts, cx, cy, angle), fill=fill)


def _erode(mask: np.ndarray, width: int) -> np.ndarray:
    """Binary erosion by a (2·width+1)² square, by shifting (masks are tiny)."""
    out = mask.copy()
    for _ in range(width):
        inner = out.copy()
        inner[1:, :] &= out[:-1, :]
        inner[:-1, :] &= out[1:, :]
        inner[:, 1:] &= out[:, :-1]
        inner[:, :-1] &= out[:, 1:]
        out = inner
    return out


@lru_cache(maxsize=8)
def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32)
    return xs, ys


def _pattern(texture: str, side: int, rng: random.Random) -> np.ndarray | None:
    """Boolean "ink" pattern of a texture over the whole canvas (None for solid/hollow)."""
    if texture in ("solid", "hollow"):
        return None
    xs, ys = _grid(side)
    scale = side / 128.0
    if texture == "striped":
        period = rng.uniform(8.0, 11.0) * scale
        angle = rng.choice((0.0, 45.0, 90.0, 135.0)) + rng.uniform(-8.0, 8.0)
        a = math.radians(angle)
        phase = rng.uniform(0, period)
        u = xs * math.cos(a) + ys * math.sin(a) + phase
        return (u % period) < period * 0.5
    if texture == "dotted":
        period = rng.uniform(11.0, 14.0) * scale
        radius = period * rng.uniform(0.27, 0.33)
        ox, oy = rng.uniform(0, period), rng.uniform(0, period)
        dx = (xs + ox) % period - period / 2
        dy = (ys + oy) % period - period / 2
        return dx * dx + dy * dy < radius * radius
    if texture == "checkered":
        period = rng.uniform(7.5, 10.5) * scale
        ox, oy = rng.uniform(0, 2 * period), rng.uniform(0, 2 * period)
        return (np.floor((xs + ox) / period) + np.floor((ys + oy) / period)) % 2 == 0
    raise ValueError(texture)  # pragma: no cover


def _shade(rgb: np.ndarray) -> np.ndarray:
    """Second colour of a pattern: a dark shade of light colours, a pale tint of dark ones."""
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    if luminance > 170:
        return rgb * 0.45
    return rgb * 0.35 + 255 * 0.65


def _layout(count: int, side: float, rng: random.Random, v2: bool) -> list[tuple[float, float, float]]:
    """(cx, cy, r) per object: cells so objects never overlap; v2 draws smaller, off-centre objects."""
    if count == 1:
        cells = [(0.0, 0.0, side, side)]
    elif count == 2:
        if rng.random() < 0.5:
            cells = [(0.0, 0.0, side / 2, side), (side / 2, 0.0, side / 2, side)]
        else:
            cells = [(0.0, 0.0, side, side / 2), (0.0, side / 2, side, side / 2)]
    else:
        h = side / 2
        quads = [(0.0, 0.0, h, h), (h, 0.0, h, h), (0.0, h, h, h), (h, h, h, h)]
        cells = rng.sample(quads, count) if count < 4 else quads
    lo, hi = (0.5, 0.8) if v2 else (0.68, 0.95)
    margin = side * 0.04
    objects = []
    for x0, y0, w, h in cells:
        r_max = min(w, h) / 2 - margin
        r = r_max * rng.uniform(lo, hi)
        # clean keeps objects near the cell centre, v2 lets them wander to the cell edge
        spread = 1.0 if v2 else 0.45
        cx = x0 + w / 2 + rng.uniform(-1, 1) * spread * (w / 2 - margin - r)
        cy = y0 + h / 2 + rng.uniform(-1, 1) * spread * (h / 2 - margin - r)
        objects.append((cx, cy, r))
    return objects


def _clutter_background(img: Image.Image, rng: random.Random) -> None:
    draw = ImageDraw.Draw(img)
    side = img.size[0]
    palette = list(COLORS.values())
    for _ in range(rng.randint(4, 7)):  # muted blocks
        x0, y0 = rng.uniform(-0.2, 0.9) * side, rng.uniform(-0.2, 0.9) * side
        x1, y1 = x0 + rng.uniform(0.15, 0.6) * side, y0 + rng.uniform(0.15, 0.6) * side
        base = rng.choice(palette) if rng.random() < 0.5 else tuple(rng.randint(40, 220) for _ in range(3))
        tone = tuple(int(0.5 * c + 0.5 * rng.randint(60, 190)) for c in base)
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=tone)
        else:
            draw.ellipse((x0, y0, x1, y1), fill=tone)
    _strokes(draw, side, rng, rng.randint(6, 11), palette)


def _strokes(draw: ImageDraw.ImageDraw, side: int, rng: random.Random, n: int, palette: list) -> None:
    for _ in range(n):
        pts = [(rng.uniform(0, side), rng.uniform(0, side)) for _ in range(rng.randint(2, 4))]
        color = rng.choice(palette) if rng.random() < 0.6 else tuple(rng.randint(0, 255) for _ in range(3))
        draw.line(pts, fill=color, width=max(1, int(rng.uniform(1.0, 4.5) * side / 128)))


# --------------------------------------------------------------------------------------------------
# rendering


def render(scene: Scene, rng: random.Random, size: int = 64) -> Image.Image:
    """Draw `scene` as an RGB `size`×`size` image; all randomness comes from `rng`."""
    side = size * _SUPERSAMPLE
    domain = scene.domain
    img = Image.new("RGB", (side, side), scene.background)
    if domain == "clutter":
        _clutter_background(img, rng)
    canvas = np.array(img, dtype=np.float32)
    base = np.array(COLORS[scene.color], dtype=np.float32)
    jitter = 30.0 if domain == "noisy" else 10.0
    objects = _layout(scene.count, float(side), rng, v2=(domain == "clean_v2"))
    angle = rng.uniform(-0.2, 0.2)  # the copies in one scene share orientation and pattern
    pattern = _pattern(scene.texture, side, rng)
    outline_w = max(1, round(side / 128 * rng.uniform(2.2, 3.4)))
    silhouette = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(silhouette)
    for cx, cy, r in objects:
        _draw_shape(draw, scene.shape, cx, cy, r, angle + rng.uniform(-0.08, 0.08))
    mask = np.asarray(silhouette) > 127
    inner = _erode(mask, outline_w)
    edge = mask & ~inner
    color = np.clip(base + np.array([rng.uniform(-jitter, jitter) for _ in range(3)], dtype=np.float32), 0, 255)
    if domain == "sketch":
        grey = np.float32(rng.uniform(40, 90))
        ink = 0.78 * grey + 0.22 * color  # colour mostly lost: a faint tint survives
        canvas[edge] = ink
        if pattern is not None:
            hatch = inner & pattern
            lightness = rng.uniform(0.45, 0.6)
            canvas[hatch] = canvas[hatch] * lightness + ink * (1 - lightness)
    elif scene.texture == "hollow":
        canvas[edge] = color
    elif pattern is None:
        canvas[mask] = color
    else:
        ink, paper = (_shade(color), color) if scene.texture == "dotted" else (color, _shade(color))
        canvas[inner & pattern] = ink  # dots are the second colour on a body of the object's colour
        canvas[inner & ~pattern] = paper
        canvas[edge] = color
    img = Image.fromarray(canvas.astype(np.uint8), "RGB")
    if domain == "clutter":
        d = ImageDraw.Draw(img)
        _strokes(d, side, rng, rng.randint(1, 3), list(COLORS.values()))
    img = img.reduce(_SUPERSAMPLE) if _SUPERSAMPLE > 1 else img
    if domain == "noisy":
        img = _noisy(img, rng)
    return img


def _noisy(img: Image.Image, rng: random.Random) -> Image.Image:
    gen = np.random.default_rng(rng.getrandbits(63))
    arr = np.asarray(img, dtype=np.float32)
    contrast = rng.uniform(0.7, 1.15)
    brightness = rng.uniform(-25, 25)
    mean = arr.mean()
    arr = (arr - mean) * contrast + mean + brightness
    sigma = rng.uniform(14, 34)
    arr = arr + gen.normal(0.0, sigma, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------------
# captions

_TEXTURE_ADJ = {
    "solid": ("solid", "filled", "plain"),
    "striped": ("striped", "stripy"),
    "dotted": ("dotted", "polka-dot", "spotted"),
    "checkered": ("checkered", "checked"),
    "hollow": ("hollow", "outlined"),
}
_TEXTURE_WITH = {
    "striped": ("with stripes",),
    "dotted": ("with dots", "with polka dots"),
    "checkered": ("with a checkerboard pattern",),
    "hollow": ("drawn as an outline",),
}
_FRAMES = {
    "clean": ("a photo of {}", "{}", "an image of {}", "a picture of {}", "a rendering of {}",
              "{} on a plain background", "a photo of {} on a grey background", "a close-up photo of {}"),
    "noisy": ("a noisy photo of {}", "a grainy picture of {}", "a low quality photo of {}",
              "a blurry image of {}"),
    "sketch": ("a sketch of {}", "a drawing of {}", "a pencil sketch of {}", "a line drawing of {}",
               "a black and white sketch of {}"),
    "clutter": ("{} on a cluttered background", "a photo of {} on a busy background", "{} among clutter",
                "a messy picture with {}"),
}
# how often a noisy/clutter/v2 caption uses the generic clean frames instead (alt-text rarely says)
_GENERIC_FRAME_P = {"clean": 1.0, "clean_v2": 1.0, "noisy": 0.5, "clutter": 0.4, "sketch": 0.1}


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _frame(domain: str, phrase: str, rng: random.Random) -> str:
    key = "clean" if rng.random() < _GENERIC_FRAME_P[domain] else domain
    return rng.choice(_FRAMES[key]).format(phrase)


def noun_phrase(scene: Scene, rng: random.Random) -> str:
    """Counted noun phrase with randomly omitted attributes, e.g. "two red striped circles"."""
    plural = scene.count > 1
    color_p = 0.3 if scene.domain == "sketch" else 0.85
    words: list[str] = []
    color = scene.color if rng.random() < color_p else None
    texture_adj = texture_with = None
    if rng.random() < (0.2 if scene.texture == "solid" else 0.6):
        if scene.texture in _TEXTURE_WITH and rng.random() < 0.3:
            texture_with = rng.choice(_TEXTURE_WITH[scene.texture])
        else:
            texture_adj = rng.choice(_TEXTURE_ADJ[scene.texture])
    if rng.random() < 0.05:  # the shape is not named at all
        noun = rng.choice(("object", "shape", "thing"))
    else:
        noun = scene.shape
    adjectives = [a for a in (color, texture_adj) if a]
    if len(adjectives) == 2 and rng.random() < 0.3:
        adjectives.reverse()
    words += adjectives
    words.append(PLURALS.get(noun, noun + "s") if plural else noun)
    body = " ".join(words)
    if plural:
        roll = rng.random()
        if roll < 0.8:
            body = f"{COUNT_WORDS[scene.count]} {body}"
        elif roll < 0.9:
            body = f"some {body}" if scene.count < 4 else f"many {body}"
        # else: bare plural ("red circles")
    else:
        body = f"one {body}" if rng.random() < 0.12 else f"{_article(body)} {body}"
    if texture_with:
        if plural:
            texture_with = texture_with.replace("as an outline", "as outlines")
        body = f"{body} {texture_with}"
    return body


def caption(scene: Scene, rng: random.Random) -> str:
    """A varied natural caption for contrastive pretraining; attributes are sometimes omitted."""
    roll = rng.random()
    # rare forms that give the downstream templates' words ("shape", "texture", "something",
    # "objects") some meaning without ever spelling out a downstream prompt verbatim too often
    if roll < 0.025 and scene.count == 1:
        return f"a photo of {_article(scene.shape)} {scene.shape} shape"
    if roll < 0.045 and scene.texture != "solid":
        adj = rng.choice(_TEXTURE_ADJ[scene.texture])
        return f"{_article(adj)} {adj} texture"
    if roll < 0.06 and scene.count == 1 and scene.domain != "sketch":
        return f"a photo of something {scene.color}"
    if roll < 0.08:
        noun = "object" if scene.count == 1 else "objects"
        return f"a photo of {COUNT_WORDS[scene.count]} {noun}"
    return _frame(scene.domain, noun_phrase(scene, rng), rng)
