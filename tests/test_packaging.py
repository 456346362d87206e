"""The package stands alone: a wheel carries the configs and the example files they use, the dependency
lists say what lift3d imports, and README's commands are the ones CI runs."""

import ast
import glob
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "lift3d")

# import name -> distribution name, where they differ
DIST = {"PIL": "pillow", "mcubes": "pymcubes", "imageio_ffmpeg": "imageio-ffmpeg", "pybullet_data": "pybullet",
        "fast_simplification": "fast-simplification", "huggingface_hub": "huggingface-hub", "yaml": "pyyaml"}
# Guarded imports, used when present and never installed by pip: the CUDA accelerators (tinycudann's hash
# grid, gsplat's Gaussian rasterizer); the loss-curve plotter (lift3d/utils/figures.py draws with PIL without it).
OPTIONAL_UNDECLARED = {"tinycudann", "matplotlib", "gsplat"}


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:                  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _requirements(path: str) -> list[str]:
    with open(os.path.join(ROOT, path)) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def test_requirements_files_match_pyproject():
    project = _pyproject()["project"]
    core = {_name(r): r for r in project["dependencies"]}
    reqs = {_name(r): r for r in _requirements("requirements.txt")}
    assert set(reqs) == set(core)
    assert reqs.pop("torch") == "torch==2.13.0"          # pinned here: an unpinned torch pulls CUDA
    assert all(reqs[n].replace("_", "-").lower() == core[n].replace("_", "-").lower() for n in reqs)
    extras = project["optional-dependencies"]
    optional = {_name(r) for name, rs in extras.items() if name != "dev" for r in rs}
    assert extras["dev"] == [f"lift3d[{','.join(sorted(n for n in extras if n != 'dev'))}]"]
    dev = _requirements("requirements-dev.txt")
    assert dev[0] == "-r requirements.txt" and {_name(r) for r in dev[1:]} == optional
    assert not optional & set(core), "an extra that the core installs anyway"
    assert {"ray", "pybullet", "pytest"} <= optional and "rtree" not in core


def test_every_third_party_import_is_declared():
    project = _pyproject()["project"]
    declared = {_name(r) for r in project["dependencies"]}
    declared |= {_name(r) for rs in project["optional-dependencies"].values() for r in rs}
    imported = set()
    for path in glob.glob(os.path.join(PKG, "**", "*.py"), recursive=True):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"lift3d"} - OPTIONAL_UNDECLARED
    missing = {m for m in third_party if DIST.get(m, m).lower().replace("_", "-") not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


def _package_data_files() -> set:
    patterns = _pyproject()["tool"]["setuptools"]["package-data"]["lift3d"]
    return {os.path.relpath(p, PKG) for pat in patterns for p in glob.glob(os.path.join(PKG, pat), recursive=True)
            if os.path.isfile(p)}


def test_wheel_package_data_carries_configs_and_the_example_files_they_use():
    from lift3d.config import packaged_configs

    shipped = _package_data_files()
    configs = packaged_configs()
    assert {"zero123-sjc-cpu", "zero123-sjc", "cascade-zero123", "oracle"} <= set(configs)
    used = set()
    for path in configs.values():
        assert os.path.relpath(path, PKG) in shipped
        with open(path) as f:
            used |= set(re.findall(r"\$\{pkg:([^}]+)\}", f.read()))
    assert "examples/mushroom_rgba.png" in used and "examples/objects/mushroom/meshes/model.obj" in used
    for rel in used:
        assert rel in shipped, f"{rel} is used by a packaged config but not in pyproject's package-data"
    # The mesh's material and texture come along (the .mtl names texture.png).
    assert {"examples/objects/mushroom/meshes/model.mtl",
            "examples/objects/mushroom/materials/textures/texture.png"} <= shipped
    assert any(f.startswith("assets/zero123-mini/") for f in shipped)      # the bundled model


def test_repository_configs_and_examples_link_into_the_package():
    for name in ("configs", "examples"):
        path = os.path.join(ROOT, name)
        assert os.path.islink(path) and os.readlink(path) == f"lift3d/{name}", f"{name} must be a relative symlink"
        assert os.path.samefile(path, os.path.join(PKG, name))


def _fenced_after(text: str, marker: str) -> str:
    block = text[text.index(marker):]
    return re.search(r"```bash\n(.*?)\n```", block, re.S).group(1).replace("\\\n", "").strip()


def test_ci_runs_readme_test_command_and_readme_main_command_is_current():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    test_cmd = _fenced_after(readme, "Run the tests")
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [line.strip() for line in f]
    assert test_cmd in ci, f".ci/run must run README's test command: {test_cmd}"
    assert "requirements-dev.txt" in test_cmd and "scripts/test.sh" in test_cmd
    main_cmd = _fenced_after(readme, "Run the main job")
    assert "pip install -r requirements.txt" in main_cmd
    config = re.search(r"--config (\S+)", main_cmd).group(1)
    assert os.path.isfile(os.path.join(ROOT, config))
