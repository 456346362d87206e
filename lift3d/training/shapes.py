"""Procedural training objects: primitives, deformed and combined, with varied colours and patterns.

Every object is a ``trimesh.Trimesh`` with per-vertex colours (the CPU raycaster interpolates
them), built deterministically from an integer seed, so an object id names the same object on
every machine. Patterns (stripes, checker, gradient, spots, two-tone) are functions of the
vertex position in the part's own frame; primitives are subdivided first so patterns and
deformations have enough vertices to show.
"""

from __future__ import annotations

import numpy as np

PRIMITIVES = ("box", "sphere", "cylinder", "cone", "capsule", "torus")
PATTERNS = ("plain", "stripes", "checker", "gradient", "spots", "two-tone")


def _primitive(kind: str, rng: np.random.Generator):
    import trimesh

    if kind == "box":
        mesh = trimesh.creation.box(extents=rng.uniform(0.4, 1.0, 3))
        mesh = mesh.subdivide_to_size(0.08)
    elif kind == "sphere":
        mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    elif kind == "cylinder":
        mesh = trimesh.creation.cylinder(radius=rng.uniform(0.2, 0.5), height=rng.uniform(0.4, 1.0), sections=32)
        mesh = mesh.subdivide_to_size(0.1)
    elif kind == "cone":
        mesh = trimesh.creation.cone(radius=rng.uniform(0.25, 0.5), height=rng.uniform(0.5, 1.0), sections=32)
        mesh = mesh.subdivide_to_size(0.1)
    elif kind == "capsule":
        mesh = trimesh.creation.capsule(height=rng.uniform(0.3, 0.8), radius=rng.uniform(0.15, 0.3), count=[24, 24])
    else:
        mesh = trimesh.creation.torus(major_radius=0.35, minor_radius=rng.uniform(0.08, 0.18),
                                      major_sections=32, minor_sections=16)
    return mesh


def _deform(vertices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Non-uniform scale, then a random twist / bend / taper / bulge about the z axis."""
    v = vertices * rng.uniform(0.6, 1.4, 3)
    z = v[:, 2]
    kind = rng.integers(5)
    if kind == 1:  # twist
        a = rng.uniform(-2.0, 2.0) * z
        c, s = np.cos(a), np.sin(a)
        v = np.stack([c * v[:, 0] - s * v[:, 1], s * v[:, 0] + c * v[:, 1], z], -1)
    elif kind == 2:  # bend in the xz-plane
        v[:, 0] += rng.uniform(-0.6, 0.6) * z ** 2
    elif kind == 3:  # taper
        v[:, :2] *= (1 + rng.uniform(-0.7, 0.7) * z)[:, None]
    elif kind == 4:  # bulge
        v[:, :2] *= (1 + rng.uniform(-0.4, 0.6) * np.exp(-(z / 0.25) ** 2))[:, None]
    return v


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.3, 1.0), rng.uniform(0.35, 1.0)))


def _paint(local: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 3) RGB in [0, 1] for vertices at ``local`` positions, from a random pattern."""
    a, b = _random_colour(rng), _random_colour(rng)
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    axis = local @ _unit(rng.normal(size=3))
    freq = rng.uniform(4, 10)
    if pattern == "plain":
        w = np.zeros(len(local))
    elif pattern == "stripes":
        w = (np.sin(axis * freq * np.pi) > 0).astype(float)
    elif pattern == "checker":
        w = (np.floor(local * freq / 2).sum(-1) % 2).astype(float)
    elif pattern == "gradient":
        w = np.clip(axis + 0.5, 0, 1)
    elif pattern == "spots":
        centres = rng.uniform(-0.5, 0.5, (8, 3))
        d = np.linalg.norm(local[:, None] - centres[None], axis=-1).min(1)
        w = (d < rng.uniform(0.08, 0.18)).astype(float)
    else:  # two-tone: split by a plane
        w = (axis > rng.uniform(-0.2, 0.2)).astype(float)
    return a * (1 - w[:, None]) + b * w[:, None]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(np.linalg.norm(v), 1e-9)


def _random_rotation(rng: np.random.Generator, full: bool) -> np.ndarray:
    """A rotation matrix: about z only (objects stand upright) or a full random one."""
    import trimesh

    if full:
        return trimesh.transformations.random_rotation_matrix(rng.uniform(size=3))[:3, :3]
    return trimesh.transformations.rotation_matrix(rng.uniform(0, 2 * np.pi), [0, 0, 1])[:3, :3]


def procedural_object(seed: int):
    """An object of 1 to 3 coloured, deformed primitives, deterministic in ``seed`` (not normalised)."""
    import trimesh

    rng = np.random.default_rng(seed)
    parts = []
    n_parts = int(rng.choice([1, 2, 2, 3]))
    for i in range(n_parts):
        mesh = _primitive(PRIMITIVES[rng.integers(len(PRIMITIVES))], rng)
        local = np.asarray(mesh.vertices, dtype=np.float64)
        colours = _paint(local, rng)
        v = _deform(local, rng)
        # The first part stays upright at the origin; others are attached around it.
        v = v @ _random_rotation(rng, full=i > 0).T
        if i > 0:
            v = v * rng.uniform(0.4, 0.8) + rng.uniform(-0.45, 0.45, 3)
        rgba = np.concatenate([colours, np.ones((len(v), 1))], -1)
        parts.append(trimesh.Trimesh(v, mesh.faces, vertex_colors=(rgba * 255).astype(np.uint8), process=False))
    return parts[0] if len(parts) == 1 else trimesh.util.concatenate(parts)
