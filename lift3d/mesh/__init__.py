"""Ground-truth meshes: loading (:mod:`lift3d.mesh.io`) and CPU ray-cast rendering (:mod:`lift3d.mesh.raycast`).

Public API::

    from lift3d.mesh import load_mesh, normalize_mesh, geometry_only, MeshRaycaster
    mesh = load_mesh("obj/meshes/model.obj", normalize=True)   # trimesh.Trimesh, longest side 1, centred
    out = MeshRaycaster(mesh).render(cameras)                  # rgba, depth, normal, position, mask
    solid = geometry_only(mesh)                                # UV seams merged: watertight, volume
"""

from lift3d.mesh.io import geometry_only, load_mesh, normalize_mesh
from lift3d.mesh.raycast import MeshRaycaster

__all__ = ["load_mesh", "normalize_mesh", "geometry_only", "MeshRaycaster"]
