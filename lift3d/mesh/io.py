"""Loading ground-truth meshes (OBJ/GLB/PLY/...) as one ``trimesh.Trimesh`` with their colours.

``load_mesh`` merges a multi-part scene into one mesh (trimesh packs the textures into one
atlas) and repairs the texture references trimesh leaves unresolved:

- Google Scanned Objects: ``meshes/model.mtl`` says ``map_Kd texture.png`` but the image lives
  in ``materials/textures/texture.png``;
- pybullet-style assets: ``map_Kd ../cube.png`` (trimesh refuses parent paths) or a Windows
  absolute path such as ``E:\\develop\\data\\table.png`` (only the file name is still right).

``geometry_only`` drops the colours and closes the UV seams (for watertightness and volume tests).
A lift3d export (``export/model.obj``/``.glb``) is stored y-up for glTF and Blender; ``load_mesh``
turns it back into lift3d's z-up world frame (see lift3d/export/frame.py), so metrics score it
where it was trained. ``normalize_mesh`` applies the GSO/SyncDreamer convention: scale so the longest side of the
bounding box is 1, then centre the bounding box at the origin.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Optional

import numpy as np

from lift3d.errors import UserError

log = logging.getLogger(__name__)

# Where a texture named in an .mtl may really be, relative to the .mtl's and the .obj's folders.
_TEXTURE_FOLDERS = (".", "..", "textures", "../textures", "../../textures", "../materials/textures",
                    "materials/textures")


MAX_COORDINATE = 1e9     # a mesh vertex further out than this from the origin is refused (millimetres: 1000 km)


def load_mesh(path: str, normalize: bool = False):
    """Load ``path`` as one ``trimesh.Trimesh`` (scene parts merged, scene transforms applied).

    ``path`` is a mesh file or a Google-Scanned-Objects folder (``<dir>/meshes/model.obj``).
    Colours are kept as trimesh visuals: ``TextureVisuals`` (UVs + a ``SimpleMaterial`` or
    ``PBRMaterial`` image) or ``ColorVisuals`` (vertex/face colours). With ``normalize`` the
    mesh is returned in the normalised frame of :func:`normalize_mesh`.
    Raises :class:`UserError` for a missing, unreadable or empty file.
    """
    import trimesh

    if path and os.path.isdir(path) and os.path.isfile(os.path.join(path, "meshes", "model.obj")):
        path = os.path.join(path, "meshes", "model.obj")  # a Google-Scanned-Objects folder
    from lift3d.utils.inputs import require_file

    require_file(path, "mesh file", "pass an .obj/.glb/.ply file or a GSO object folder (<NAME>/meshes/model.obj)")
    try:
        loaded = trimesh.load(path, process=False)  # processing would silently drop NaN vertices: check first
    except Exception as e:  # trimesh raises many types (ValueError, KeyError, parse errors...)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read mesh {path}: {msg}") from None
    for part in (loaded.geometry.values() if isinstance(loaded, trimesh.Scene) else [loaded]):
        if isinstance(part, trimesh.Trimesh):
            bad = int((~np.isfinite(np.asarray(part.vertices))).any(1).sum())
            if bad:
                raise UserError(f"mesh {path} has {bad} vertices that are not finite (NaN or inf); fix or re-export it")
            peak = float(np.abs(np.asarray(part.vertices)).max(initial=0.0))
            if peak > MAX_COORDINATE:       # beyond any unit a mesh is written in; its areas and distances overflow
                raise UserError(f"mesh {path} has coordinates up to {peak:.3g}, more than {MAX_COORDINATE:g}: it "
                                "cannot be measured (its areas and distances overflow); fix or re-export it")
            part.process()  # what trimesh.load does by default: merge duplicate vertices

    parts = _mesh_parts(loaded)
    if not parts:
        raise UserError(f"mesh {path} has no triangles (is it a point cloud or an empty scene?)")
    if path.lower().endswith(".obj"):
        materials = _mtl_textures(path)
        for part in parts:
            _attach_missing_texture(part, materials)
    mesh = parts[0] if len(parts) == 1 else trimesh.util.concatenate(parts)
    from lift3d.export.frame import world_from_file

    to_world = world_from_file(path, loaded)
    if to_world is not None:
        mesh.apply_transform(to_world)
    if normalize:
        mesh, _, _ = normalize_mesh(mesh)
    return mesh


def normalize_mesh(mesh):
    """Return ``(normalized_copy, scale, offset)`` with ``v_normalized = v * scale + offset``.

    ``scale = 1 / (longest side of the bounding box)`` and ``offset = -scale * bbox_centre``, so
    the copy spans [-0.5, 0.5] along its longest axis and its bounding box is centred at the
    origin (the Google-Scanned-Objects convention used by SyncDreamer's evaluation).
    """
    lo, hi = mesh.bounds
    extent = float(np.max(hi - lo))
    if not extent > 0:
        raise UserError("cannot normalise a mesh whose bounding box has zero size")
    scale = 1.0 / extent
    offset = -scale * (lo + hi) / 2
    out = mesh.copy()
    out.vertices = np.asarray(mesh.vertices) * scale + offset
    return out, scale, offset


def geometry_only(mesh):
    """A colourless copy whose vertices are merged by position.

    Textured meshes duplicate vertices along UV seams, which makes a closed surface look open;
    use this copy for watertightness, volume, ``contains`` and surface sampling.
    """
    import trimesh

    out = trimesh.Trimesh(np.asarray(mesh.vertices), np.asarray(mesh.faces), process=False)
    out.merge_vertices(merge_tex=True, merge_norm=True)
    out.remove_unreferenced_vertices()
    return out


# --------------------------------------------------------------------------- helpers


def _mesh_parts(loaded) -> list:
    """The triangle meshes in whatever ``trimesh.load`` returned, scene transforms applied."""
    import trimesh

    if isinstance(loaded, trimesh.Scene):
        # dump() returns copies of every instance with its scene-graph transform baked in.
        geometries = loaded.dump(concatenate=False) if loaded.geometry else []
    else:
        geometries = [loaded]
    return [g for g in geometries if isinstance(g, trimesh.Trimesh) and len(g.faces) > 0]


def _mtl_textures(obj_path: str) -> dict[str, Optional[str]]:
    """Map every material named in the OBJ's .mtl files to its existing ``map_Kd`` file (or None)."""
    obj_dir = os.path.dirname(os.path.abspath(obj_path))
    mtl_names = []
    with open(obj_path, "r", errors="replace") as f:
        for line in f:
            if line.startswith("mtllib"):
                mtl_names.append(line[len("mtllib"):].strip())
    found = {}
    for name in mtl_names:
        mtl = _find_file(name, [obj_dir])
        if mtl is None:
            continue
        mtl_dir = os.path.dirname(mtl)
        material = None
        with open(mtl, "r", errors="replace") as f:
            for line in f:
                line = line.strip()
                if line.startswith("newmtl"):
                    material = line[len("newmtl"):].strip()
                    found.setdefault(material, None)
                elif line.startswith("map_Kd") and material is not None:
                    texture = _find_file(_map_path(line[len("map_Kd"):]), [mtl_dir, obj_dir])
                    found[material] = texture
    return found


def _map_path(args: str) -> str:
    """The file name of a ``map_Kd [-options ...] file`` statement."""
    tokens = args.split()
    if any(t.startswith("-") for t in tokens):
        return tokens[-1]  # options take values; the file name comes last
    return args.strip()


def _find_file(reference: str, folders: list[str]) -> Optional[str]:
    """First existing file for ``reference`` as written, or by its base name in likely folders."""
    reference = reference.strip().strip('"')
    if not reference:
        return None
    base = re.split(r"[\\/]", reference)[-1]
    candidates = []
    for folder in folders:
        candidates.append(os.path.normpath(os.path.join(folder, reference.replace("\\", "/"))))
        candidates += [os.path.normpath(os.path.join(folder, sub, base)) for sub in _TEXTURE_FOLDERS]
    return next((c for c in candidates if os.path.isfile(c)), None)


def _attach_missing_texture(part, textures: dict[str, Optional[str]]) -> None:
    """Give a UV-mapped part whose material lost its image the file the .mtl names."""
    from PIL import Image
    from trimesh.visual.material import SimpleMaterial

    visual = part.visual
    material = getattr(visual, "material", None)
    if visual.kind != "texture" or getattr(visual, "uv", None) is None or material is None:
        return
    if getattr(material, "image", None) is not None or getattr(material, "baseColorTexture", None) is not None:
        return
    name = getattr(material, "name", None)
    files = {t for t in textures.values() if t is not None}
    # trimesh sometimes renames materials; if the name is unknown, a single texture is unambiguous.
    texture = textures[name] if name in textures else (files.pop() if len(files) == 1 else None)
    if texture is None:
        return
    try:
        image = Image.open(texture)
        image.load()
    except Exception as e:
        log.warning("cannot read texture %s (%s); the mesh stays untextured", texture, e)
        return
    if isinstance(material, SimpleMaterial):
        material.image = image
    else:
        visual.material = SimpleMaterial(image=image, name=getattr(material, "name", None))
