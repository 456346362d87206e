"""Named evaluation protocols: how meshes are normalised, aligned and turned into point sets.

- ``syncdreamer``: the SyncDreamer / Wonder3D GSO protocol. The ground truth is normalised
  (longest bbox side 1, bbox centred); the prediction is taken as is, in that frame (SyncDreamer
  does the same: predictions live in the rendering frame), no ICP. Chamfer points are the
  surface points seen by the 16 evaluation cameras (elevation 30, azimuth every 22.5 deg,
  distance 1.5, 256 x 256, fovy 49.13 deg), thinned by a 0.01 voxel-grid average. Volume IoU on
  a 64^3 grid over [-1, 1]^3.
- ``surface``: area-uniform surface samples (100k per mesh), Chamfer, F-scores, volume IoU at
  128^3 and 64^3; the prediction is taken as is.
- ``surface-icp``: like ``surface``, but both meshes are normalised and the prediction is
  rigidly aligned to the ground truth by ICP (for predictions from other methods and frames).

Any protocol can turn the normalised ground truth about z by SyncDreamer's per-object angle
(``gt_rotation_deg``; :data:`SYNCDREAMER_GT_ANGLE_DEG` by object), as SyncDreamer's evaluation does,
for predictions made from SyncDreamer's published renders of its GSO objects.

Chamfer everywhere: unsquared Euclidean nearest-neighbour distances, the mean of the two
directions' means. Distances are in the ground truth's normalised frame (longest side 1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

# SyncDreamer's GSO render set-up: K = [[280, 0, 128], [0, 280, 128]] at 256 px.
EVAL_ELEVATION_DEG = 30.0
EVAL_DISTANCE = 1.5
EVAL_RESOLUTION = 256
EVAL_FOVY_DEG = float(np.degrees(2 * np.arctan(128 / 280)))   # 49.134
EVAL_N_VIEWS = 16

# SyncDreamer's eval_mesh.py (get_gt_rotate_angle) turns each ground-truth mesh about z by an angle
# chosen per object, so that it lines up with SyncDreamer's published renders of it (lift3d's
# evaluation cameras are the same as SyncDreamer's: view 0 on +x, azimuth towards +y). The keys
# are the 30 object aliases of its GSO evaluation set; the objects it does not turn have 0.
_SYNCDREAMER_ANGLE_GROUPS = {
    -90.0: ("sofa",),
    270.0: ("blocks", "alarm", "backpack", "chicken", "soap", "grandfather", "grandmother", "lion", "lunch_bag",
            "mario", "oil"),
    180.0: ("elephant", "school_bus1"),
    225.0: ("school_bus2", "shoe", "train", "turtle"),
    112.5: ("sorter",),
    0.0: ("bell", "cream", "hat", "leather", "shoe1", "shoe2", "shoe3", "sorting_board", "stucking_cups", "teapot",
          "toaster"),
}
SYNCDREAMER_GT_ANGLE_DEG = {name: angle for angle, names in _SYNCDREAMER_ANGLE_GROUPS.items() for name in names}


@dataclass(frozen=True)
class Protocol:
    name: str
    points: str = "surface"                 # "surface" (area-uniform samples) | "visible" (ray-cast from eval cameras)
    n_points: int = 100_000                 # surface samples per mesh
    voxel_downsample: float = 0.0           # voxel size of the point thinning (0: none)
    normalize_pred: bool = False            # also normalise the prediction (longest side 1, centred)
    icp: bool = False
    icp_iterations: int = 50
    icp_points: int = 20_000
    fscore_thresholds: tuple = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
    iou_resolutions: tuple = (64,)          # the first one is reported as volume_iou
    iou_bound: float = 1.0                  # grid over [-bound, bound]^3
    inside_test: str = "ray-vote"           # see inside.py
    inside_directions: int = 7
    seed: int = 0
    gt_rotation_deg: float = 0.0            # SyncDreamer's per-object angle (see gt_rotation); 0: none

    def describe(self) -> dict:
        """Every choice, in words, for the metrics JSON."""
        res = self.iou_resolutions
        if self.points == "visible":
            points = (f"surface points seen from {EVAL_N_VIEWS} cameras (elevation {EVAL_ELEVATION_DEG:g} deg, azimuth "
                      f"every {360 / EVAL_N_VIEWS:g} deg, distance {EVAL_DISTANCE:g}, {EVAL_RESOLUTION}x{EVAL_RESOLUTION} "
                      f"px, fovy {EVAL_FOVY_DEG:.2f} deg): first hits of the pixel-centre rays by embree ray casting "
                      "of both meshes (the ground truth's depth is exact, not read from 16-bit PNGs)")
        else:
            points = f"{self.n_points} area-uniform random surface samples per mesh (seed {self.seed})"
        if self.voxel_downsample:
            points += (f"; thinned to the mean point of each occupied {self.voxel_downsample:g} voxel "
                       "(Open3D voxel_down_sample semantics)")
        return {
            "name": self.name,
            "normalization": ("ground truth: scaled so the longest bounding-box side is 1, bounding box centred at "
                              "the origin; prediction: " + ("normalised the same way" if self.normalize_pred else
                                                            "as given (assumed to be in the ground truth's frame)")),
            "alignment": self._alignment(),
            "points": points,
            "chamfer": "unsquared Euclidean nearest-neighbour distances; (mean pred->gt + mean gt->pred) / 2",
            "f_score": ("per threshold tau: 2PR/(P+R), P = fraction of prediction points within tau of the ground "
                        "truth points, R = fraction of ground-truth points within tau of the prediction points"),
            "volume_grid": (f"occupancy at the cell centres of a {' and '.join(f'{r}^3' for r in res)} grid over "
                            f"[-{self.iou_bound:g}, {self.iou_bound:g}]^3; IoU = |A and B| / |A or B|"),
            "inside_test": (f"embree first-hit ray vote over {self.inside_directions} fixed directions: inside when "
                            "most rays first meet a back face (winding repaired, normals outward)"
                            if self.inside_test == "ray-vote" else
                            "generalised winding number > 0.5 (brute force)"),
        }

    def _alignment(self) -> str:
        if not (self.icp or self.gt_rotation_deg):
            return "none (no ICP, no rotation search, no per-object rotation)"
        parts = []
        if self.gt_rotation_deg:
            parts.append(f"ground truth turned about z after normalisation by SyncDreamer's per-object angle "
                         f"{self.gt_rotation_deg:g} deg (a rotation of {-self.gt_rotation_deg:g} deg about +z)")
        parts.append(f"rigid point-to-point ICP of the prediction onto the ground truth ({self.icp_iterations} "
                     f"iterations, {self.icp_points} points each)" if self.icp else "no ICP, no rotation search")
        return "; ".join(parts)


PROTOCOLS = {
    "syncdreamer": Protocol("syncdreamer", points="visible", voxel_downsample=0.01, iou_resolutions=(64,)),
    "surface": Protocol("surface", iou_resolutions=(128, 64)),
    "surface-icp": Protocol("surface-icp", iou_resolutions=(128, 64), normalize_pred=True, icp=True),
}


def get_protocol(name: str, **overrides) -> Protocol:
    from lift3d.errors import UserError

    if name not in PROTOCOLS:
        raise UserError(f"unknown evaluation protocol '{name}'; choose one of {', '.join(PROTOCOLS)}")
    valid = {f.name for f in dataclasses.fields(Protocol)} - {"name"}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise UserError(f"unknown protocol option(s) {', '.join(bad)}; valid: {', '.join(sorted(valid))}")
    return dataclasses.replace(PROTOCOLS[name], **overrides)


def syncdreamer_gt_angle(name: str) -> float:
    """SyncDreamer's ground-truth angle for one of its GSO evaluation objects (``sofa`` -> -90)."""
    from lift3d.errors import UserError

    if name not in SYNCDREAMER_GT_ANGLE_DEG:
        raise UserError(f"unknown SyncDreamer object '{name}'; its GSO evaluation objects are "
                        f"{', '.join(sorted(SYNCDREAMER_GT_ANGLE_DEG))}")
    return SYNCDREAMER_GT_ANGLE_DEG[name]


def gt_rotation(angle_deg: float) -> np.ndarray:
    """The 3x3 rotation SyncDreamer applies to a normalised ground truth for its angle ``angle_deg``.

    Its eval_mesh.py (transform_gt) builds R with transforms3d's ``euler2mat(-radians(angle), 0, 0,
    'szyx')``: a rotation about z by minus the angle; vertices become ``vertices @ R.T``. So sofa's
    -90 turns +x to +y (counter-clockwise seen from above); checked against transforms3d 0.4.2.
    """
    a = np.radians(-float(angle_deg))
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


def eval_cameras():
    """The 16 SyncDreamer evaluation cameras (view 0 at azimuth 0 is the usual input view)."""
    from lift3d.cameras import orbit_views

    return orbit_views(EVAL_N_VIEWS, EVAL_ELEVATION_DEG, EVAL_DISTANCE, EVAL_FOVY_DEG, EVAL_RESOLUTION, EVAL_RESOLUTION)


def visible_points(mesh, cameras=None) -> np.ndarray:
    """(N, 3) first hits of every pixel ray of ``cameras`` (default: :func:`eval_cameras`)."""
    from lift3d.mesh.raycast import MeshRaycaster

    cameras = eval_cameras() if cameras is None else cameras
    caster = MeshRaycaster(mesh)
    origins, directions = cameras.rays()
    hits = caster.cast(origins.reshape(-1, 3).double().numpy(), directions.reshape(-1, 3).double().numpy())
    return hits["position"][hits["face_id"] >= 0]


def surface_points(mesh, n: int, seed: int = 0) -> np.ndarray:
    import trimesh

    points, _ = trimesh.sample.sample_surface(mesh, int(n), seed=seed)
    return np.asarray(points, np.float64)


def voxel_downsample(points: np.ndarray, voxel: float) -> np.ndarray:
    """Mean point per occupied voxel; voxels start half a voxel below the points' minimum (as Open3D)."""
    if voxel <= 0 or len(points) == 0:
        return points
    origin = points.min(0) - voxel / 2
    keys = np.floor((points - origin) / voxel).astype(np.int64)
    _, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    sums = np.zeros((len(counts), 3))
    np.add.at(sums, inverse, points)
    return sums / counts[:, None]
