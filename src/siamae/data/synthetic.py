"""Built-in synthetic data: procedurally textured objects on textured backgrounds.

Every image or video is a pure function of (seed, index), so the demo needs no download and
runs the same everywhere. Videos move each object along its own straight path with a little
spin while the background pans and the lighting drifts, and come with per-pixel object-id masks (0 background, 1..K
objects; later objects occlude earlier ones): labels to propagate and check against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class _Texture:
    """A colour texture made of a few oriented sinusoids between two colours (analytic)."""

    freqs: np.ndarray
    angles: np.ndarray
    phases: np.ndarray
    colors: np.ndarray  # (2, 3)

    @staticmethod
    def random(rng: np.random.Generator, low: float, high: float) -> _Texture:
        n = int(rng.integers(1, 4))
        colors = rng.uniform(0, 255, size=(2, 3))
        return _Texture(
            rng.uniform(low, high, n),
            rng.uniform(0, np.pi, n),
            rng.uniform(0, 2 * np.pi, n),
            colors,
        )

    def render(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """x, y: (H, W) coordinates in image-widths -> (H, W, 3) float in [0, 255]."""
        t = np.zeros_like(x)
        for f, a, p in zip(self.freqs, self.angles, self.phases):
            t += np.sin(2 * np.pi * f * (x * np.cos(a) + y * np.sin(a)) + p)
        t = (t / len(self.freqs) + 1) / 2
        t = t[..., None]
        return self.colors[0] * (1 - t) + self.colors[1] * t


@dataclass
class _Object:
    shape: str
    center: np.ndarray  # (2,) x, y in image-widths
    velocity: np.ndarray  # per frame
    radii: np.ndarray  # (2,)
    angle: float
    spin: float
    texture: _Texture

    def coords(self, x: np.ndarray, y: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
        cx, cy = self.center + self.velocity * t
        a = self.angle + self.spin * t
        dx, dy = x - cx, y - cy
        return dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)

    def mask(self, x: np.ndarray, y: np.ndarray, t: int) -> np.ndarray:
        u, v = self.coords(x, y, t)
        u, v = u / self.radii[0], v / self.radii[1]
        if self.shape == "ellipse":
            return u**2 + v**2 <= 1
        if self.shape == "rectangle":
            return (np.abs(u) <= 1) & (np.abs(v) <= 1)
        # triangle with apex (0, -1) and base from (-1, 1) to (1, 1)
        return (v <= 1) & (v >= -1 + 2 * np.abs(u))


def _scene(rng: np.random.Generator) -> tuple[_Texture, np.ndarray, list[_Object]]:
    background = _Texture.random(rng, 1.5, 6.0)
    pan = rng.uniform(-0.006, 0.006, size=2)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        objects.append(
            _Object(
                shape=str(rng.choice(["ellipse", "rectangle", "triangle"])),
                center=rng.uniform(0.25, 0.75, size=2),
                velocity=rng.uniform(-0.012, 0.012, size=2),
                radii=rng.uniform(0.08, 0.22, size=2),
                angle=float(rng.uniform(0, np.pi)),
                spin=float(rng.uniform(-0.03, 0.03)),
                texture=_Texture.random(rng, 6.0, 20.0),
            )
        )
    return background, pan, objects


def synthetic_video(
    index: int, size: int = 128, num_frames: int = 24, seed: int = 0, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A short video of textured objects moving over a panning textured background.

    Returns:
        frames: (T, H, W, 3) uint8, H = ``size``, W = ``width`` or ``size``.
        masks: (T, H, W) uint8 object ids, 0 = background.
    """
    rng = np.random.default_rng([seed, index, 0x5A4E])
    background, pan, objects = _scene(rng)
    # Lighting that drifts over time (auto-exposure, passing clouds): a correspondence must see
    # through it, which matching raw colours alone cannot.
    gain_amplitude, gain_period, gain_phase = (
        rng.uniform(0.1, 0.3),
        rng.uniform(6, 12),
        rng.uniform(0, 2 * np.pi),
    )
    h, w = size, width or size
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    x, y = (xs + 0.5) / max(h, w), (ys + 0.5) / max(h, w)
    frames = np.empty((num_frames, h, w, 3), dtype=np.uint8)
    masks = np.zeros((num_frames, h, w), dtype=np.uint8)
    for t in range(num_frames):
        img = background.render(x + pan[0] * t, y + pan[1] * t)
        for k, obj in enumerate(objects, start=1):
            inside = obj.mask(x, y, t)
            u, v = obj.coords(x, y, t)
            shade = 0.75 + 0.25 * np.clip(1 - (u**2 + v**2) / (obj.radii.max() ** 2 * 2), 0, 1)
            img = np.where(inside[..., None], obj.texture.render(u, v) * shade[..., None], img)
            masks[t][inside] = k
        gain = 1 + gain_amplitude * np.sin(2 * np.pi * t / gain_period + gain_phase)
        frames[t] = np.clip(img * gain, 0, 255).astype(np.uint8)
    return frames, masks


def synthetic_image(index: int, size: int = 128, seed: int = 0) -> np.ndarray:
    """One (H, W, 3) uint8 image: the first frame of ``synthetic_video(index)``."""
    frames, _ = synthetic_video(index, size, 1, seed)
    return frames[0]
