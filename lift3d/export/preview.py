"""Pictures of the exported mesh as a viewer shows it, for the turntable and the summary image.

Two panels per view, ray-cast with :class:`lift3d.mesh.raycast.MeshRaycaster` (no GPU):
``textured`` (the baked texture under the raycaster's fixed light) and ``shaded`` (plain grey under
the same light: the shape alone, with every hole and bump the texture might hide).
"""

from __future__ import annotations

import torch

from lift3d.cameras import Cameras


def mesh_panels(mesh_path: str, cameras: Cameras) -> dict:
    """{"textured", "shaded"}: (B, H, W, 3) images on white of the mesh file at ``cameras``."""
    import trimesh

    from lift3d.mesh.io import load_mesh
    from lift3d.mesh.raycast import MeshRaycaster

    mesh = load_mesh(mesh_path)                        # back in the world frame of the cameras
    plain = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    out = {}
    for name, m in (("textured", mesh), ("shaded", plain)):
        rgba = MeshRaycaster(m).render(cameras.to("cpu"), shading="lambert", samples_per_pixel=4)["rgba"]
        out[name] = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
    return out
