"""Geometry plugins: the voxel radiance field, the hash encoding and the hash-grid NeRF."""

import math

import pytest
import torch
import torch.nn.functional as F

from lift3d.errors import ConfigError
from lift3d.geometry.hash_encoding import PRIMES, HashEncoding, level_resolutions
from lift3d.geometry.hashgrid_nerf import HashGridNeRF
from lift3d.geometry.voxel_rf import VoxelRadianceField
from lift3d.registry import find


def voxel_centre(i, g, r):
    return -r + (i + 0.5) * 2 * r / g


# ---------------------------------------------------------------------------- voxel-rf


def test_registered_names():
    assert find("voxel-rf") is VoxelRadianceField
    assert find("hashgrid-nerf") is HashGridNeRF


def test_voxel_density_formula_at_voxel_centres():
    torch.manual_seed(0)
    g, r, shift, d_scale = 6, 1.5, -1.0, 0.3
    field = VoxelRadianceField({"grid_size": g, "radius": r, "density_shift": shift})
    with torch.no_grad():
        field.density_raw.normal_()
        field.d_scale.fill_(d_scale)
    raw = field.density_raw[0, 0]          # stored (Z, Y, X)
    for ix, iy, iz in [(0, 0, 0), (5, 1, 2), (2, 4, 5), (3, 3, 1)]:
        p = torch.tensor([[voxel_centre(ix, g, r), voxel_centre(iy, g, r), voxel_centre(iz, g, r)]])
        expected = math.log1p(math.exp(raw[iz, iy, ix].item() * math.exp(d_scale) + shift))
        assert field.density(p).item() == pytest.approx(expected, rel=1e-5)


def test_voxel_trilinear_between_centres_and_feature_activations():
    torch.manual_seed(1)
    g = 4
    rgb = VoxelRadianceField({"grid_size": g, "n_feature_dims": 3, "init_color": "randn"})
    lat = VoxelRadianceField({"grid_size": g, "n_feature_dims": 4})
    with torch.no_grad():
        rgb.density_raw.normal_()
    raw = rgb.density_raw[0, 0]
    # Halfway between voxels ix = 1 and ix = 2 (same iy, iz): the raw values average.
    p = torch.tensor([[0.0, voxel_centre(2, g, 1.0), voxel_centre(3, g, 1.0)]])
    expected = F.softplus((raw[3, 2, 1] + raw[3, 2, 2]) / 2 - 1.0)
    assert rgb.density(p).item() == pytest.approx(expected.item(), rel=1e-5)
    q = torch.tensor([[voxel_centre(1, g, 1.0), voxel_centre(0, g, 1.0), voxel_centre(2, g, 1.0)]])
    assert torch.allclose(rgb(q)["features"][0], torch.sigmoid(rgb.features_raw[0, :, 2, 0, 1]), atol=1e-6)
    # Latents are stored raw (3drec), initialised randn.
    assert torch.allclose(lat(q)["features"][0], lat.features_raw[0, :, 2, 0, 1], atol=1e-6)
    assert lat.features_raw.std() > 0.5
    # RGB default init is a neutral grey.
    assert torch.allclose(VoxelRadianceField({"grid_size": g})(q)["features"], torch.full((1, 3), 0.5))


def test_density_grid_is_indexed_x_y_z():
    g = 5
    field = VoxelRadianceField({"grid_size": g, "density_shift": 0.0})
    iz, iy, ix = torch.meshgrid(torch.arange(g), torch.arange(g), torch.arange(g), indexing="ij")
    with torch.no_grad():   # an asymmetric field: raw = x + 10 y + 100 z in voxel units
        field.density_raw[0, 0] = (ix + 10 * iy + 100 * iz).float()
    grid = field.density_grid(g)
    assert grid.shape == (g, g, g)
    i, j, k = torch.meshgrid(torch.arange(g), torch.arange(g), torch.arange(g), indexing="ij")
    assert torch.allclose(grid, F.softplus((i + 10 * j + 100 * k).float()), rtol=1e-5)


def test_normals_point_outwards_from_a_blob():
    g = 32
    field = VoxelRadianceField({"grid_size": g})
    c = (torch.arange(g) + 0.5) / g * 2 - 1
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    with torch.no_grad():
        field.density_raw[0, 0] = 5 * torch.exp(-(xx ** 2 + yy ** 2 + zz ** 2) / 0.2)
    points = torch.tensor([[0.4, 0.0, 0.0], [0.0, -0.3, 0.2], [0.2, 0.2, -0.3]])
    normals = field.normal(points, eps=0.05)
    assert torch.allclose(normals.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert ((normals * F.normalize(points, dim=-1)).sum(-1) > 0.98).all()


def test_bad_voxel_config_is_a_user_error():
    with pytest.raises(ConfigError, match="n_feature_dims"):
        VoxelRadianceField({"n_feature_dims": 5})
    with pytest.raises(ConfigError):
        VoxelRadianceField({"grid_sise": 10})


# ---------------------------------------------------------------------------- hash encoding


def slow_hash_encoding(enc: HashEncoding, x01: torch.Tensor) -> torch.Tensor:
    """Point by point, corner by corner, with Python integers (an independent reference)."""
    out = torch.zeros(len(x01), enc.n_output_dims, dtype=torch.float64)
    for n, p in enumerate(x01.double().tolist()):
        for level, res in enumerate(enc.resolutions):
            table = enc.tables[level].detach().double()
            pos = [v * res for v in p]
            cell = [min(int(math.floor(v)), res - 1) for v in pos]
            frac = [v - c for v, c in zip(pos, cell)]
            acc = torch.zeros(enc.n_features_per_level, dtype=torch.float64)
            for dx in (0, 1):
                for dy in (0, 1):
                    for dz in (0, 1):
                        x, y, z = cell[0] + dx, cell[1] + dy, cell[2] + dz
                        if (res + 1) ** 3 <= enc.table_size:
                            row = x + (res + 1) * y + (res + 1) ** 2 * z
                        else:
                            row = ((x * PRIMES[0]) ^ (y * PRIMES[1]) ^ (z * PRIMES[2])) % enc.table_size
                        w = ((frac[0] if dx else 1 - frac[0]) * (frac[1] if dy else 1 - frac[1])
                             * (frac[2] if dz else 1 - frac[2]))
                        acc += w * table[row]
            f = enc.n_features_per_level
            out[n, level * f:(level + 1) * f] = acc
    return out


def test_hash_encoding_matches_slow_reference():
    torch.manual_seed(0)
    # Resolutions 2, 4, 8, 16, 32: the first two levels are dense in a 128-row table, the rest hashed.
    enc = HashEncoding(n_levels=5, n_features_per_level=2, log2_hashmap_size=7, base_resolution=2,
                       per_level_scale=2.0, init_scale=1.0)
    assert enc.resolutions == [2, 4, 8, 16, 32]
    assert enc.dense == [True, True, False, False, False]
    x = torch.rand(25, 3)
    x[0] = torch.tensor([0.0, 1.0, 0.5])      # box faces
    x[1] = torch.tensor([1.0, 1.0, 1.0])
    fast = enc(x).double()
    assert torch.allclose(fast, slow_hash_encoding(enc, x), atol=1e-5)


def test_hash_encoding_large_coordinates_hash_like_uint32():
    """The int32 trick must reproduce unsigned 32-bit hashing for big vertex coordinates."""
    enc = HashEncoding(n_levels=1, log2_hashmap_size=19, base_resolution=4096, per_level_scale=1.0)
    cells = torch.tensor([[4095, 4095, 17], [123, 3999, 4000], [0, 1, 2]], dtype=torch.int32)
    rows = enc.corner_rows(0, cells).tolist()
    for cell, got in zip(cells.tolist(), rows):
        corners = [(cell[0] + (c & 1), cell[1] + ((c >> 1) & 1), cell[2] + ((c >> 2) & 1)) for c in range(8)]
        assert got == [((x * PRIMES[0]) ^ (y * PRIMES[1]) ^ (z * PRIMES[2])) % (1 << 19) for x, y, z in corners]


def test_level_resolutions_follow_the_geometric_series():
    res = level_resolutions(16, 16, 1.447269237440378)
    assert res[0] == 16 and 4000 <= res[-1] <= 4100
    assert all(b > a for a, b in zip(res, res[1:]))


# ---------------------------------------------------------------------------- hashgrid-nerf

SMALL = {"n_levels": 4, "log2_hashmap_size": 12, "base_resolution": 4, "per_level_scale": 2.0, "mlp_neurons": 16}


def test_hashgrid_blob_bias_and_activations():
    field = HashGridNeRF(dict(SMALL, n_feature_dims=3))
    with torch.no_grad():   # silence the MLPs: only the density bias is left
        for mlp in (field.density_mlp, field.feature_mlp):
            mlp[-1].weight.zero_()
            mlp[-1].bias.zero_()
    points = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.6, 0.8]])
    expected = F.softplus(10 * (1 - points.norm(dim=-1) / 0.5))
    assert torch.allclose(field.density(points), expected, rtol=1e-5)
    assert torch.allclose(field(points)["features"], torch.full((3, 3), 0.5))
    exp_field = HashGridNeRF(dict(SMALL, density_activation="exp", density_bias="-1.0"))
    with torch.no_grad():
        exp_field.density_mlp[-1].weight.zero_()
        exp_field.density_mlp[-1].bias.zero_()
    assert torch.allclose(exp_field.density(points), torch.full((3,), math.exp(-1.0)))


def test_hashgrid_latent_features_and_gradients():
    torch.manual_seed(0)
    field = HashGridNeRF(dict(SMALL, n_feature_dims=4, hash_backend="torch"))
    points = torch.rand(64, 3) * 2 - 1
    out = field(points)
    assert out["density"].shape == (64,) and out["features"].shape == (64, 4)
    assert (out["density"] >= 0).all()
    (out["density"].sum() + out["features"].pow(2).sum()).backward()
    for name, p in field.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_hashgrid_bad_config():
    with pytest.raises(ConfigError, match="density_bias"):
        HashGridNeRF(dict(SMALL, density_bias="blobby"))
    with pytest.raises(ConfigError, match="hash_backend"):
        HashGridNeRF(dict(SMALL, hash_backend="cuda"))
