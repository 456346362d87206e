"""The coordinate frame of exported files, and how to get back to lift3d's world frame.

lift3d's world is z-up (cameras, fields, ground-truth meshes: see lift3d/cameras.py). glTF is
y-up by specification, and Blender's OBJ importer assumes y-up (forward -Z, up Y) by default, so
exported files store y-up coordinates unless ``system.export.up_axis`` is ``"z"``:

    file (x, y, z) = world (y, z, x)        a proper rotation (det +1)

The reference camera (azimuth 0) looks from world +x, which becomes file +z: glTF's front, where
three.js's default camera and Blender's Front view look from, so viewers open on the side the user
photographed (its image-right, world +y, is file +x). Exports written before this frame (file =
world (x, z, -y), the input view on +x) say so by lacking the ``front=+z`` mark and still load.

Every exported file says which frame it is in, in two places, so that metrics score it in the
world frame whatever travels with it: ``<name>_info.json`` next to it (``files`` ->
``world_from_file``), and a marker inside the file (an OBJ header comment, glTF mesh ``extras``).
:func:`world_from_file` reads them; ``lift3d.mesh.io.load_mesh`` applies it.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

UP_AXES = ("y", "z")

# file-from-world rotations (3x3), one per up axis.
_FILE_FROM_WORLD = {
    "y": np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]),
    "z": np.eye(3),
}
# Read-only: the y-up frame of earlier exports (the input view on file +x).
_LEGACY_Y = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
FRONT_MARK = "front=+z"

OBJ_MARKER = "# lift3d export frame:"      # e.g. "# lift3d export frame: up_axis=y front=+z"
EXTRAS_KEY = "lift3d_frame"                 # glTF mesh extras: {"up_axis": "y", "front": "+z"}


def file_from_world(up_axis: str) -> np.ndarray:
    """3x3 rotation taking world (z-up) coordinates to the file's frame."""
    if up_axis not in _FILE_FROM_WORLD:
        raise ValueError(f"up_axis must be one of {UP_AXES}, got {up_axis!r}")
    return _FILE_FROM_WORLD[up_axis].copy()


def world_from_file_matrix(up_axis: str, legacy: bool = False) -> np.ndarray:
    """4x4 transform taking the file's coordinates back to the world frame (``legacy``: a y-up
    export from before the input view was put on +z)."""
    out = np.eye(4)
    out[:3, :3] = (_LEGACY_Y if legacy and up_axis == "y" else file_from_world(up_axis)).T
    return out


def marker_text(up_axis: str) -> str:
    """The OBJ header line that names the frame."""
    return f"{OBJ_MARKER} up_axis={up_axis} {FRONT_MARK}"


def frame_description(up_axis: str) -> dict:
    """What ``model_info.json`` says about a file's frame."""
    if up_axis == "y":
        axes = ("file x = world y, file y = world z (up), file z = world x (the reference view's side: glTF's "
                "front, +z; glTF / Blender-import convention)")
        front = "+z"
    else:
        axes = "file axes = world axes (z up)"
        front = "+x"
    return {"up_axis": up_axis, "axes": axes, "reference_view_side": front,
            "world_from_file": world_from_file_matrix(up_axis).tolist()}


def info_path_for(mesh_path: str) -> str:
    """``out/model.obj`` -> ``out/model_info.json``."""
    stem = os.path.splitext(os.path.basename(mesh_path))[0]
    return os.path.join(os.path.dirname(mesh_path), f"{stem}_info.json")


def world_from_file(mesh_path: str, loaded=None) -> Optional[np.ndarray]:
    """4x4 transform of a lift3d export back to the world frame; None for any other file.

    Looks at ``<name>_info.json`` next to the file first, then at the marker inside the file
    (OBJ header comment; for glTF, the ``extras`` trimesh put in the ``metadata`` of ``loaded``).
    """
    info = info_path_for(mesh_path)
    if os.path.lexists(info):        # a damaged one is refused: scoring in a wrong frame would go unnoticed
        from lift3d.utils.inputs import read_json_object

        files = read_json_object(info, "mesh info", "fix or delete it (it comes with a lift3d export)").get("files")
        entry = files.get(os.path.basename(mesh_path)) if isinstance(files, dict) else None
        if isinstance(entry, dict) and "world_from_file" in entry:
            return np.asarray(entry["world_from_file"], dtype=np.float64)
    if mesh_path.lower().endswith(".obj"):
        with open(mesh_path, "r", errors="replace") as f:
            for _, line in zip(range(5), f):
                if line.startswith(OBJ_MARKER):
                    words = line[len(OBJ_MARKER):].split()
                    axis = words[0].replace("up_axis=", "") if words else ""
                    return world_from_file_matrix(axis, FRONT_MARK not in words) if axis in UP_AXES else None
        return None
    for meta in _metadata(loaded):
        entry = meta.get(EXTRAS_KEY)
        if isinstance(entry, dict) and entry.get("up_axis") in UP_AXES:
            return world_from_file_matrix(entry["up_axis"], entry.get("front") != "+z")
    return None


def _metadata(loaded) -> list:
    if loaded is None:
        return []
    if hasattr(loaded, "geometry"):
        return [getattr(g, "metadata", {}) or {} for g in loaded.geometry.values()] + [loaded.metadata or {}]
    return [getattr(loaded, "metadata", {}) or {}]
