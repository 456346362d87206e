"""Build the bundled example objects: small procedural toys in the Google-Scanned-Objects layout.

Each object is modelled as a signed distance function (a few primitives with smooth unions),
meshed by marching cubes (watertight by construction), decimated to a few thousand faces,
UV-unwrapped with xatlas and given a baked texture whose colours come from a procedural paint
function (different colours per part, plus markings that make every side distinguishable).

Output, for every object NAME (sizes in metres, z up, standing on z = 0, like GSO scans):

    examples/objects/NAME/meshes/model.obj, model.mtl   (map_Kd texture.png, as in GSO)
    examples/objects/NAME/materials/textures/texture.png
    examples/objects/NAME/metadata.pbtxt
    examples/NAME_rgba.png   reference image of the normalised object (see examples/README.md)
    examples/NAME.json       the reference camera

Usage: python scripts/make_example_object.py [--out examples] [--objects mug,car,mushroom]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lift3d.cameras import Cameras  # noqa: E402
from lift3d.mesh import MeshRaycaster, load_mesh  # noqa: E402
from lift3d.utils.io import save_image, write_json, write_text  # noqa: E402

# The reference camera of every example image: SyncDreamer's GSO renders (view 000).
REFERENCE = {"elevation_deg": 30.0, "azimuth_deg": 0.0, "camera_distance": 1.5, "fovy_deg": 49.13,
             "height": 256, "width": 256, "shading": "lambert", "samples_per_pixel": 16}
TEXTURE_SIZE = 512
TARGET_FACES = 4000

# --------------------------------------------------------------------------- SDF primitives


def length(x):
    return np.linalg.norm(x, axis=-1)


def smooth_union(a, b, k):
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0, 1)
    return b * (1 - h) + a * h - k * h * (1 - h)


def rounded_box(p, centre, half, r):
    q = np.abs(p - centre) - (np.asarray(half) - r)
    return length(np.maximum(q, 0)) + np.minimum(q.max(-1), 0) - r


def cylinder(p, centre, radius, half_height, axis=2, r=0.0):
    """Capped cylinder along ``axis`` with edges rounded by ``r``."""
    d = p - centre
    radial = length(np.delete(d, axis, axis=-1))
    q = np.stack([radial - radius + r, np.abs(d[..., axis]) - half_height + r], -1)
    return length(np.maximum(q, 0)) + np.minimum(q.max(-1), 0) - r


def torus(p, centre, major, minor, axis=0):
    """Torus whose ring lies in the plane orthogonal to ``axis``."""
    d = p - centre
    q = np.stack([length(np.delete(d, axis, axis=-1)) - major, d[..., axis]], -1)
    return length(q) - minor


def ellipsoid(p, centre, radii):
    d = (p - centre) / radii
    k0, k1 = length(d), length(d / radii)
    return k0 * (k0 - 1) / np.maximum(k1, 1e-12)


def yaw(p, degrees):
    """Rotate points by -degrees about z: evaluating a shape there rotates the shape by +degrees."""
    a = np.radians(degrees)
    x, y = p[..., 0] * np.cos(a) + p[..., 1] * np.sin(a), -p[..., 0] * np.sin(a) + p[..., 1] * np.cos(a)
    return np.stack([x, y, p[..., 2]], -1)


# --------------------------------------------------------------------------- objects
# Each returns (sdf(p) -> (N,), paint(p) -> (N, 3) RGB in [0, 1], bounds (2, 3)).

RED, WHITE, CREAM, NAVY, YELLOW = (0.85, 0.15, 0.1), (0.96, 0.96, 0.94), (0.95, 0.9, 0.78), (0.12, 0.2, 0.55), (0.98, 0.8, 0.1)


def mug():
    def parts(p):
        body = cylinder(p, (0, 0, 0.05), 0.04, 0.05, r=0.003)
        handle = torus(p, (0, 0.05, 0.052), 0.022, 0.0065, axis=0)
        cavity = cylinder(p, (0, 0, 0.1), 0.034, 0.093, r=0.003)
        return body, handle, cavity

    def sdf(p):
        body, handle, cavity = parts(p)
        return np.maximum(smooth_union(body, handle, 0.004), -cavity)

    def paint(p):
        body, handle, cavity = parts(p)
        z = p[..., 2]
        out = np.tile(RED, (len(p), 1))
        out[(z > 0.062) & (z < 0.074)] = WHITE                              # band
        logo = np.arctan2(p[..., 1], p[..., 0]) * 0.04                         # arc length from +x
        out[logo ** 2 + (z - 0.035) ** 2 < 0.014 ** 2] = YELLOW              # a sun on the front
        out[(logo + 0.04) ** 2 + (z - 0.03) ** 2 < 0.006 ** 2] = NAVY        # and a dot beside it
        out[np.abs(cavity) < np.abs(body)] = CREAM                             # inside
        out[z > 0.0985] = WHITE                                               # rim
        out[np.abs(handle) < np.minimum(np.abs(body), np.abs(cavity))] = NAVY
        out[z < 0.0015] = (0.3, 0.3, 0.3)                                      # base
        return out

    return sdf, paint, np.array([[-0.045, -0.045, -0.003], [0.045, 0.082, 0.103]])


def car():
    wheels = [(x, y, 0.018) for x in (-0.048, 0.05) for y in (-0.036, 0.036)]

    def parts(p):
        p = yaw(p, -35)  # a three-quarter view from the reference camera
        body = rounded_box(p, (0, 0, 0.034), (0.08, 0.038, 0.017), 0.01)
        cabin = rounded_box(p, (-0.012, 0, 0.06), (0.042, 0.033, 0.017), 0.012)
        wheel = np.min([cylinder(p, c, 0.018, 0.009, axis=1, r=0.004) for c in wheels], 0)
        return p, body, cabin, wheel

    def sdf(p):
        _, body, cabin, wheel = parts(p)
        return np.minimum(smooth_union(body, cabin, 0.006), wheel)

    def paint(p):
        q, body, cabin, wheel = parts(p)
        x, y, z = q[..., 0], q[..., 1], q[..., 2]
        out = np.tile((0.95, 0.5, 0.08), (len(p), 1))                         # orange body
        out[(np.abs(y) > 0.03) & (z > 0.028) & (z < 0.034)] = WHITE             # side stripe
        lamp = lambda cx, w: (x * np.sign(cx) > 0.075) & ((np.abs(y) - 0.024) ** 2 + (z - 0.036) ** 2 < w ** 2)
        out[lamp(1, 0.008)] = (1.0, 0.95, 0.6)                                   # headlights (front = +x)
        out[lamp(-1, 0.007)] = (0.8, 0.05, 0.05)                                 # tail lights
        out[(x > 0.078) & (np.abs(y) < 0.013) & (z < 0.04)] = (0.15, 0.15, 0.15)  # grille
        in_cabin = (cabin < body + 0.002) & (z > 0.05)
        out[in_cabin] = WHITE
        glass = in_cabin & (z > 0.053) & (z < 0.069)
        out[glass] = (0.55, 0.78, 0.95)
        out[glass & (np.abs(x + 0.012) < 0.003)] = WHITE                         # door pillar
        is_wheel = wheel < np.minimum(body, cabin)
        out[is_wheel] = (0.08, 0.08, 0.08)
        hub_distance = np.min([length(np.stack([x - c[0], z - c[2]], -1)) for c in wheels], 0)
        out[is_wheel & (np.abs(y) > 0.04) & (hub_distance < 0.009)] = (0.75, 0.75, 0.78)
        return out

    return sdf, paint, np.array([[-0.1, -0.1, -0.003], [0.1, 0.1, 0.082]])


def mushroom():
    # White spots on the big cap, at fixed directions from its centre (asymmetric on purpose).
    golden = np.pi * (3 - np.sqrt(5))
    spots = np.array([(np.cos(golden * i) * np.sqrt(1 - h * h), np.sin(golden * i) * np.sqrt(1 - h * h), h)
                      for i, h in enumerate(np.linspace(0.97, 0.15, 17))])

    def parts(p):
        z = p[..., 2]
        stem = np.maximum(length(p[..., :2]) - (0.017 - 0.005 * z / 0.07), np.maximum(-z, z - 0.07))
        stem = smooth_union(stem, ellipsoid(p, (0, 0, 0.008), (0.022, 0.022, 0.012)), 0.006)
        cap = np.maximum(ellipsoid(p, (0, 0, 0.058), (0.055, 0.055, 0.04)), 0.052 - z)
        small_stem = cylinder(p, (0.046, -0.032, 0.015), 0.007, 0.015, r=0.002)
        small_cap = np.maximum(ellipsoid(p, (0.046, -0.032, 0.028), (0.022, 0.022, 0.016)), 0.025 - z)
        return stem, cap, small_stem, small_cap

    def sdf(p):
        stem, cap, small_stem, small_cap = parts(p)
        small = smooth_union(small_stem, small_cap, 0.003)
        return smooth_union(smooth_union(stem, cap, 0.005), small, 0.004)

    def paint(p):
        stem, cap, small_stem, small_cap = parts(p)
        z = p[..., 2]
        out = np.tile(CREAM, (len(p), 1))
        big = (cap < stem) & (cap < small_cap) & (cap < small_stem)
        out[big] = RED
        d = p - np.array([0, 0, 0.058])
        cosine = (d / np.maximum(length(d), 1e-9)[:, None]) @ spots.T
        out[big & (cosine.max(-1) > 0.985)] = WHITE
        out[big & (z < 0.0545)] = (0.82, 0.7, 0.55)                               # gills
        small = (small_cap < small_stem) & (small_cap < np.minimum(cap, stem))
        out[small] = (0.75, 0.42, 0.15)
        out[small & (z < 0.0265)] = (0.82, 0.7, 0.55)
        return out

    return sdf, paint, np.array([[-0.06, -0.06, -0.003], [0.072, 0.06, 0.1]])


OBJECTS = {"mug": mug, "car": car, "mushroom": mushroom}

# --------------------------------------------------------------------------- meshing and texturing


def mesh_sdf(sdf, bounds, resolution=128):
    """Watertight marching-cubes mesh of {sdf < 0}, decimated to about TARGET_FACES faces."""
    import mcubes
    import trimesh

    step = float((bounds[1] - bounds[0]).max()) / resolution
    axes = [np.arange(lo - 2 * step, hi + 2 * step, step) for lo, hi in zip(*bounds)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    values = sdf(grid.reshape(-1, 3)).reshape(grid.shape[:3])
    # A grid value of ~0 makes marching cubes emit near-duplicate vertices around that grid point.
    values = np.where(np.abs(values) < 0.05 * step, np.where(values < 0, -0.05, 0.05) * step, values)
    vertices, faces = mcubes.marching_cubes(-values, 0.0)  # mcubes wants "inside" positive
    vertices = vertices * step + np.array([a[0] for a in axes])
    dense = trimesh.Trimesh(vertices, faces, process=True)
    # Decimation can pinch two vertices to within the OBJ's 1e-6 precision; retry with another count.
    for face_count in (TARGET_FACES, TARGET_FACES - 100, TARGET_FACES + 100, TARGET_FACES - 200):
        mesh = dense.simplify_quadric_decimation(face_count=face_count, aggression=2)  # 2: careful, keeps shape
        mesh = trimesh.Trimesh(np.round(mesh.vertices, 6), mesh.faces, process=True)
        mesh.remove_unreferenced_vertices()
        if mesh.is_watertight:
            break
    else:
        print("  warning: the decimated mesh is not watertight", file=sys.stderr)
    if mesh.volume < 0:
        mesh.invert()
    return mesh


def bake_texture(mesh, paint, size=TEXTURE_SIZE):
    """UV-unwrap ``mesh`` with xatlas and paint a size x size texture. Returns (vmapping, faces_uv, uv, image)."""
    import xatlas
    from scipy import ndimage

    atlas = xatlas.Atlas()
    atlas.add_mesh(mesh.vertices.astype(np.float32), mesh.faces.astype(np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution, pack.padding, pack.bilinear = size, 2, True
    atlas.generate(pack_options=pack)
    vmapping, faces_uv, uv = atlas[0]
    positions = mesh.vertices[vmapping]

    # Rasterise every triangle in texel space; each covered texel gets the paint of its 3D point.
    image = np.zeros((size, size, 3))
    filled = np.zeros((size, size), bool)
    texel_xy = np.stack([uv[:, 0] * size - 0.5, (1 - uv[:, 1]) * size - 0.5], -1)
    points, targets = [], []
    for face in faces_uv:
        a, b, c = texel_xy[face]
        lo, hi = np.floor(np.minimum(np.minimum(a, b), c)).astype(int), np.ceil(np.maximum(np.maximum(a, b), c)).astype(int)
        xs, ys = np.meshgrid(np.arange(max(lo[0], 0), min(hi[0], size - 1) + 1),
                             np.arange(max(lo[1], 0), min(hi[1], size - 1) + 1))
        pix = np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float64)
        m = np.array([b - a, c - a]).T
        if abs(np.linalg.det(m)) < 1e-12:
            continue
        w = np.linalg.solve(m, (pix - a).T).T                    # (s, t) with p = a + s(b-a) + t(c-a)
        bary = np.stack([1 - w.sum(-1), w[:, 0], w[:, 1]], -1)
        inside = (bary > -1e-3).all(-1)
        if inside.any():
            points.append(np.clip(bary[inside], 0, 1) @ positions[face])
            targets.append(pix[inside].astype(int))
    targets = np.concatenate(targets)
    image[targets[:, 1], targets[:, 0]] = paint(np.concatenate(points))
    filled[targets[:, 1], targets[:, 0]] = True
    # Extend charts into the empty texels so bilinear lookups at chart borders stay clean.
    _, (iy, ix) = ndimage.distance_transform_edt(~filled, return_indices=True)
    image = image[iy, ix]
    return vmapping, faces_uv, uv, (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_gso_object(folder, name, mesh, vmapping, faces_uv, uv, texture, description):
    lines = ["# lift3d procedural example object (scripts/make_example_object.py)", "mtllib model.mtl", "o model"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in mesh.vertices]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in uv]
    lines.append("usemtl material_0")
    faces_v = vmapping[faces_uv]
    lines += ["f " + " ".join(f"{v + 1}/{t + 1}" for v, t in zip(fv, ft)) for fv, ft in zip(faces_v, faces_uv)]
    write_text(os.path.join(folder, "meshes", "model.obj"), "\n".join(lines) + "\n")
    # As in GSO, the .mtl names texture.png although it lives in materials/textures/.
    write_text(os.path.join(folder, "meshes", "model.mtl"),
               "newmtl material_0\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nmap_Kd texture.png\n")
    save_image(os.path.join(folder, "materials", "textures", "texture.png"), texture)
    write_text(os.path.join(folder, "metadata.pbtxt"),
               f'name: "{name}"\ndescription: "{description}"\n'
               'license: "MIT (generated procedurally by lift3d scripts/make_example_object.py)"\n')


def render_reference(object_dir, image_path):
    from lift3d.mesh import normalize_mesh

    mesh, _, _ = normalize_mesh(load_mesh(os.path.join(object_dir, "meshes", "model.obj")))
    r = REFERENCE
    camera = Cameras.from_spherical(r["elevation_deg"], r["azimuth_deg"], r["camera_distance"], r["fovy_deg"],
                                    r["height"], r["width"])
    out = MeshRaycaster(mesh).render(camera, shading=r["shading"], samples_per_pixel=r["samples_per_pixel"])
    save_image(image_path, out["rgba"][0])
    return mesh


DESCRIPTIONS = {"mug": "A red mug with a white band, a yellow sun on the front and a navy handle",
                "car": "An orange toy car with a white cabin, blue windows and black wheels",
                "mushroom": "A red-capped mushroom with white spots and a small brown mushroom beside it"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    parser.add_argument("--objects", default=",".join(OBJECTS))
    args = parser.parse_args(argv)
    for name in args.objects.split(","):
        sdf, paint, bounds = OBJECTS[name]()
        mesh = mesh_sdf(sdf, bounds)
        vmapping, faces_uv, uv, texture = bake_texture(mesh, paint)
        folder = os.path.join(args.out, "objects", name)
        write_gso_object(folder, name, mesh, vmapping, faces_uv, uv, texture, DESCRIPTIONS[name])
        normalized = render_reference(folder, os.path.join(args.out, f"{name}_rgba.png"))
        write_json(os.path.join(args.out, f"{name}.json"), {
            "object": f"objects/{name}", "image": f"{name}_rgba.png", "mesh_normalization": "longest side 1, bbox centred",
            **REFERENCE, "faces": int(len(mesh.faces)), "watertight": bool(mesh.is_watertight),
            "extent_normalized": [round(float(e), 4) for e in normalized.extents]})
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
        print(f"{name}: {len(mesh.faces)} faces, watertight={mesh.is_watertight}, {size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
