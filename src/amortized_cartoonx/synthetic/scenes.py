"""Scenes of the synthetic cartoon benchmark: the shapes, drawing a scene from a generator, rendering it.

Every image is piece-wise smooth ("cartoon-like") by construction:

* a **background**: a smooth colour gradient, or two/three large regions split by soft straight edges,
  each with its own gradient, plus a faint low-frequency texture (a few sinusoidal plane waves);
* one **decisive object** whose *shape* is the class (:data:`SHAPES`, in the order of
  :attr:`~.dataset.CartoonConfig.classes`), at a random position, size, rotation and colour, with a light shading;
* one to three **distractor objects** of *other* classes, drawn the same way but smaller and without outline;
* pixel **noise** (Gaussian, a random level per image).

**The decision rule.** The decisive object is the one drawn with a dark outline; distractors never have
one. It is also never smaller than a distractor's largest size would make it (its circumscribed radius is
drawn from ``object_radius`` and theirs from ``distractor_radius``, which barely overlap), but the outline
is the rule. Objects never overlap: a distractor whose disc would touch another object is re-drawn
and, after ``placement_tries`` failures, left out.

**Resolution-free.** :func:`sample_scene` draws a :class:`Scene` in units of the image side (the image is the
unit square), every random choice from one ``torch.Generator`` in a fixed order; :func:`render_scene` draws
it at any size, so one scene rendered at 64 and at 128 px is the same picture (only the pixel noise is drawn
per resolution).

Shapes:
    image ``(3, S, S)`` float32 in [0, 1]; ``object_mask`` and ``distractor_mask`` ``(S, S)`` bool (the pixels
    at least half covered by the decisive object, outline included, and by any distractor).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # the config lives with the dataset, which imports this module
    from .dataset import CartoonConfig

# --------------------------------------------------------------------------------------------- shapes
# Each shape is an inside test on coordinates (x, y) in units of the object's circumscribed radius
# (the shape fits in the unit disc; y points down as in images). Shapes: (...,) -> (...,) bool.


def _disc(x: Tensor, y: Tensor) -> Tensor:
    return x * x + y * y <= 0.8**2


def _square(x: Tensor, y: Tensor) -> Tensor:
    return torch.maximum(x.abs(), y.abs()) <= 0.66


def _regular_polygon(x: Tensor, y: Tensor, sides: int, apothem: float) -> Tensor:
    inside = torch.ones_like(x, dtype=torch.bool)
    for k in range(sides):
        angle = -math.pi / 2 + (2 * k + 1) * math.pi / sides  # normals of the edges; first vertex points up
        inside &= x * math.cos(angle) + y * math.sin(angle) <= apothem
    return inside


def _triangle(x: Tensor, y: Tensor) -> Tensor:
    return _regular_polygon(x, y, 3, 0.5)  # circumradius 1


def _cross(x: Tensor, y: Tensor) -> Tensor:
    ax, ay = x.abs(), y.abs()
    return ((ax <= 0.24) & (ay <= 0.85)) | ((ay <= 0.24) & (ax <= 0.85))


def _ring(x: Tensor, y: Tensor) -> Tensor:
    r2 = x * x + y * y
    return (r2 <= 0.85**2) & (r2 >= 0.45**2)


def _star(x: Tensor, y: Tensor, points: int = 5, inner: float = 0.42) -> Tensor:
    theta = torch.atan2(x, -y) % (2 * math.pi / points)  # angle from "up"; a point of the star points up
    half = math.pi / points
    theta = torch.where(theta > half, 2 * half - theta, theta)  # mirror into [0, half]
    rho = torch.sqrt(x * x + y * y)
    px, py = rho * torch.cos(theta), rho * torch.sin(theta)
    ax, ay = 0.95, 0.0  # outer vertex
    bx, by = inner * math.cos(half), inner * math.sin(half)  # inner vertex
    # inside when p lies on the origin's side of the edge a -> b
    return (bx - ax) * (py - ay) - (by - ay) * (px - ax) >= 0


def _crescent(x: Tensor, y: Tensor) -> Tensor:
    return (x * x + y * y <= 0.85**2) & ((x - 0.4) ** 2 + (y + 0.1) ** 2 >= 0.62**2)


def _heart(x: Tensor, y: Tensor) -> Tensor:
    u, v = x * 1.3, -(y * 1.3) + 0.2  # the classic implicit heart, y up, scaled into the unit disc
    return (u * u + v * v - 1) ** 3 - u * u * v**3 <= 0


SHAPES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "disc": _disc,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
    "ring": _ring,
    "star": _star,
    "crescent": _crescent,
    "heart": _heart,
}


# --------------------------------------------------------------------------------------------- scenes


@dataclass
class Shape:
    """One object: class index, centre (cx, cy), circumscribed radius, rotation (radians), fill colour (3,),
    shading direction (radians), and outline colour (3,) or None."""

    label: int
    cx: float
    cy: float
    radius: float
    angle: float
    fill: tuple[float, float, float]
    shade_angle: float
    outline: tuple[float, float, float] | None = None


@dataclass
class Scene:
    """A resolution-free scene: everything needed to render one item at any size."""

    label: int
    background: dict
    object: Shape
    distractors: list[Shape]
    noise_std: float
    noise_seed: int


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    k = [(n + h * 6) % 6 for n in (5, 3, 1)]
    return tuple(v - v * s * max(0.0, min(kk, 4 - kk, 1.0)) for kk in k)  # type: ignore[return-value]


def _background_colour(gen: torch.Generator) -> tuple[float, float, float]:
    return _hsv(_uniform(gen, 0, 1), _uniform(gen, 0.0, 0.6), _uniform(gen, 0.5, 1.0))


def _sample_background(gen: torch.Generator, config: CartoonConfig) -> dict:
    regions = int(torch.randint(1, 4, (), generator=gen))  # 1: one gradient; 2-3: split by soft edges
    gradients = []
    for _ in range(regions):
        gradients.append(
            {
                "colours": [_background_colour(gen), _background_colour(gen)],
                "angle": _uniform(gen, 0, 2 * math.pi),
            }
        )
    edges = []
    for _ in range(regions - 1):  # a straight edge through a point near the centre
        edges.append({"px": _uniform(gen, 0.2, 0.8), "py": _uniform(gen, 0.2, 0.8), "angle": _uniform(gen, 0, math.pi)})
    waves = []
    amplitude = _uniform(gen, *config.texture_amplitude)
    for _ in range(3):
        waves.append(
            {
                "freq": _uniform(gen, 2.0, 7.0),
                "angle": _uniform(gen, 0, 2 * math.pi),
                "phase": _uniform(gen, 0, 2 * math.pi),
                "amplitude": amplitude / 3,
            }
        )
    return {"gradients": gradients, "edges": edges, "waves": waves}


def _gradient(colours: list, angle: float, xx: Tensor, yy: Tensor) -> Tensor:
    """``(3, H, W)``: a linear blend of two colours along ``angle`` across the unit square."""
    t = ((xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)) / math.sqrt(2) + 0.5
    c0, c1 = (torch.tensor(c, dtype=torch.float32).view(3, 1, 1) for c in colours)
    return c0 + (c1 - c0) * t


def render_background(background: dict, xx: Tensor, yy: Tensor, softness: float) -> Tensor:
    """``(3, H, W)`` background at the coordinates ``xx, yy`` ``(H, W)`` (unit square)."""
    grads = background["gradients"]
    image = _gradient(grads[0]["colours"], grads[0]["angle"], xx, yy)
    for edge, grad in zip(background["edges"], grads[1:]):
        side = (xx - edge["px"]) * math.cos(edge["angle"]) + (yy - edge["py"]) * math.sin(edge["angle"])
        alpha = torch.sigmoid(side / softness)  # a soft but sharp straight edge
        image = image * (1 - alpha) + _gradient(grad["colours"], grad["angle"], xx, yy) * alpha
    for wave in background["waves"]:
        phase = 2 * math.pi * wave["freq"] * (xx * math.cos(wave["angle"]) + yy * math.sin(wave["angle"]))
        image = image + wave["amplitude"] * torch.sin(phase + wave["phase"])
    return image


#: side of the coarse grid on which object colours are checked against the background.
_CONTRAST_GRID = 16


def _background_lookup(background: dict) -> Callable[[float, float], Tensor]:
    """``(x, y) -> (3,)``: the background colour near a point (from a coarse render, resolution-free)."""
    coords = (torch.arange(_CONTRAST_GRID, dtype=torch.float32) + 0.5) / _CONTRAST_GRID
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    coarse = render_background(background, xx, yy, softness=0.5 / _CONTRAST_GRID)  # (3, G, G)

    def at(x: float, y: float) -> Tensor:
        i = min(_CONTRAST_GRID - 1, int(y * _CONTRAST_GRID))
        j = min(_CONTRAST_GRID - 1, int(x * _CONTRAST_GRID))
        return coarse[:, i, j]

    return at


def _fill_colour(gen: torch.Generator, under: Tensor, config: CartoonConfig) -> tuple[float, float, float]:
    """A saturated colour at least ``min_contrast`` away from ``under`` (the best of a few draws)."""
    best, best_distance = None, -1.0
    for _ in range(12):
        colour = _hsv(_uniform(gen, 0, 1), _uniform(gen, 0.5, 1.0), _uniform(gen, 0.55, 1.0))
        distance = float(torch.linalg.vector_norm(torch.tensor(colour) - under))
        if distance > best_distance:
            best, best_distance = colour, distance
        if distance >= config.min_contrast:
            break
    return best  # type: ignore[return-value]


def _fits(cx: float, cy: float, r: float, placed: list[Shape], gap: float) -> bool:
    return all(math.hypot(cx - s.cx, cy - s.cy) >= r + s.radius + gap for s in placed)


def sample_scene(gen: torch.Generator, config: CartoonConfig) -> Scene:
    """Draw one scene from ``gen`` (every random choice comes from it, in a fixed order)."""
    num_classes = len(config.classes)
    label = int(torch.randint(num_classes, (), generator=gen))
    background = _sample_background(gen, config)
    colour_at = _background_lookup(background)

    def shape(label: int, radius: float, cx: float, cy: float, outline: bool) -> Shape:
        fill = _fill_colour(gen, colour_at(cx, cy), config)
        dark = _hsv(_uniform(gen, 0, 1), _uniform(gen, 0, 1), _uniform(gen, 0.0, 0.15)) if outline else None
        return Shape(
            label=label,
            cx=cx,
            cy=cy,
            radius=radius,
            angle=_uniform(gen, 0, 2 * math.pi),
            fill=fill,
            shade_angle=_uniform(gen, 0, 2 * math.pi),
            outline=dark,
        )

    radius = _uniform(gen, *config.object_radius)
    margin = radius + config.gap / 2
    obj = shape(label, radius, _uniform(gen, margin, 1 - margin), _uniform(gen, margin, 1 - margin), True)

    others = [c for c in range(num_classes) if c != label]
    count = int(torch.randint(config.distractors[0], config.distractors[1] + 1, (), generator=gen))
    order = torch.randperm(len(others), generator=gen)[:count].tolist()
    placed: list[Shape] = [obj]
    distractors: list[Shape] = []
    for k in order:
        r = _uniform(gen, *config.distractor_radius)
        m = r + config.gap / 2
        for _ in range(config.placement_tries):
            cx, cy = _uniform(gen, m, 1 - m), _uniform(gen, m, 1 - m)
            if _fits(cx, cy, r, placed, config.gap):
                distractors.append(shape(others[k], r, cx, cy, False))
                placed.append(distractors[-1])
                break
    noise_std = _uniform(gen, *config.noise_std)
    noise_seed = int(torch.randint(0, 2**62, (), generator=gen))
    return Scene(label, background, obj, distractors, noise_std, noise_seed)


# --------------------------------------------------------------------------------------------- rendering


def _coverage(shape: Shape, xx: Tensor, yy: Tensor, classes: tuple[str, ...]) -> Tensor:
    """Inside test of ``shape`` on sub-pixel coordinates ``xx, yy`` ``(h, w)`` -> bool ``(h, w)``."""
    dx, dy = (xx - shape.cx) / shape.radius, (yy - shape.cy) / shape.radius
    c, s = math.cos(shape.angle), math.sin(shape.angle)
    return SHAPES[classes[shape.label]](c * dx + s * dy, -s * dx + c * dy)


def _erode(inside: Tensor, pixels: int) -> Tensor:
    """Binary erosion of ``(h, w)`` by a square of half-side ``pixels`` (outside counts as outside)."""
    if pixels <= 0:
        return inside
    x = F.pad((~inside).float()[None, None], (pixels,) * 4, value=1.0)
    k = 2 * pixels + 1
    grown = F.max_pool2d(F.max_pool2d(x, (1, k), stride=1), (k, 1), stride=1)  # separable square dilation
    return grown[0, 0] < 0.5


def _box(shape: Shape, size: int) -> tuple[int, int, int, int]:
    """Pixel box ``(y0, y1, x0, x1)`` holding the shape's circumscribed disc."""
    r = shape.radius * size + 1
    cx, cy = shape.cx * size, shape.cy * size
    return (
        max(0, math.floor(cy - r)),
        min(size, math.ceil(cy + r)),
        max(0, math.floor(cx - r)),
        min(size, math.ceil(cx + r)),
    )


def render_scene(
    scene: Scene,
    config: CartoonConfig,
    size: int | None = None,
    *,
    draw_object: bool = True,
    draw_distractors: bool = True,
    noise: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Render a scene at ``size`` (default ``config.size``).

    Objects are drawn with ``supersample**2`` sub-pixels per pixel (antialiased edges), each only inside
    the box of its circumscribed disc; the background is smooth and drawn per pixel.

    Args:
        draw_object, draw_distractors, noise: leave parts out (for tests and ablations); the masks are
            always those of the full scene.

    Returns:
        image ``(3, S, S)`` float32 in [0, 1], object mask ``(S, S)`` bool, distractor mask ``(S, S)`` bool.
    """
    size = size or config.size
    ss = config.supersample
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (S, S) pixel centres in the unit square
    image = render_background(scene.background, xx, yy, softness=0.5 / size)  # (3, S, S)
    object_cover = torch.zeros(size, size)
    distractor_cover = torch.zeros(size, size)
    for shape in [*scene.distractors, scene.object]:
        y0, y1, x0, x1 = _box(shape, size)
        sub_y = (torch.arange(y0 * ss, y1 * ss, dtype=torch.float32) + 0.5) / (size * ss)
        sub_x = (torch.arange(x0 * ss, x1 * ss, dtype=torch.float32) + 0.5) / (size * ss)
        syy, sxx = torch.meshgrid(sub_y, sub_x, indexing="ij")  # (s*h, s*w) sub-pixel centres
        inside = _coverage(shape, sxx, syy, config.classes)
        shade = (sxx - shape.cx) * math.cos(shape.shade_angle) + (syy - shape.cy) * math.sin(shape.shade_angle)
        colour = torch.tensor(shape.fill).view(3, 1, 1) * (1 + config.shading * shade / shape.radius)
        if shape.outline is not None:
            width = max(1, round(config.outline_width * size)) * ss
            ring = inside & ~_erode(inside, width)
            colour = torch.where(ring, torch.tensor(shape.outline).view(3, 1, 1), colour)
        alpha = F.avg_pool2d(inside.float()[None], ss)[0]  # (h, w) antialiased coverage
        drawn = draw_object if shape is scene.object else draw_distractors
        if drawn:
            premultiplied = F.avg_pool2d((colour * inside)[None], ss)[0]  # (3, h, w)
            crop = image[:, y0:y1, x0:x1]
            image[:, y0:y1, x0:x1] = crop * (1 - alpha) + premultiplied
        cover = object_cover if shape is scene.object else distractor_cover
        cover[y0:y1, x0:x1] = torch.maximum(cover[y0:y1, x0:x1], alpha)
    if noise and scene.noise_std > 0:
        gen = torch.Generator().manual_seed(scene.noise_seed + size)
        image = image + scene.noise_std * torch.randn(image.shape, generator=gen)
    object_mask = object_cover >= 0.5
    distractor_mask = (distractor_cover >= 0.5) & ~object_mask
    return image.clamp(0.0, 1.0), object_mask, distractor_mask
