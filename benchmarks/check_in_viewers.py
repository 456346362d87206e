"""Open an export in Blender and in three.js as a user would; check it stands upright and looks like lift3d's render.

    python benchmarks/check_in_viewers.py TRIAL/export [--out DIR]

- **Blender** (``blender`` on PATH; Debian's ``blender`` package works, with ``python3-numpy``, which
  its glTF importer needs and the package does not pull in) in background mode imports
  ``model.glb`` and ``model.obj`` with its default importers, prints each object's bounding box in
  Blender's z-up scene and renders the GLB with Cycles (Standard view transform, not Filmic): a
  lit screenshot, and one of the surface colour alone (emission) with a transparent background.
- **three.js** (headless Chromium driven by puppeteer-core; ``three`` and ``puppeteer-core`` are
  installed with npm into ``--three`` when missing) loads ``model.glb`` with ``GLTFLoader``, prints
  its bounding box in three.js's y-up scene, whether it has normals and a texture, and takes the
  same two screenshots (lit; unlit ``MeshBasicMaterial`` on a transparent background).

"Upright" means the viewer shows the file as lift3d reads it (its box is the world box taken to the
file's frame by ``lift3d.export.frame`` and then to the viewer's axes) and the viewer's up (Blender
+z, three.js +y) is the world's up (+z).

The pixels: both viewers look from one camera placed in the glTF file's frame (from glTF's front,
+z, a little right and above, three.js's and Blender's own up); the same camera, taken to lift3d's
world frame with ``world_from_file``, renders the mesh with lift3d's ray caster
(``lift3d/mesh/raycast.py``, surface colour alone). Each viewer's unlit screenshot is compared with
it: silhouette IoU (alpha >= 0.5) and the mean colour difference where both are opaque. The script
exits 1 when a viewer is not upright or its silhouette IoU is below ``--min-iou`` (0.9). A viewer
that is missing is reported, not an error. The screenshots and ``lift3d.png`` go to ``--out``
(default: the export folder).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NPM_PACKAGES = ("three@0.170.0", "puppeteer-core@23")

# Blender's glTF importer, and its OBJ importer with its defaults (forward -Z, up Y), turn a y-up
# file into its z-up scene: Blender (x, y, z) = file (x, -z, y). A viewer convention, not lift3d's.
BLENDER_FROM_FILE = np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])
THREE_FROM_FILE = np.eye(3)                  # three.js shows glTF coordinates as they are
VIEWER_UP = {"blender": (0.0, 0.0, 1.0), "three.js": (0.0, 1.0, 0.0)}

# The viewers' camera, in the glTF file's frame: from glTF's front (+z), a little right (+x) and
# above (+y), at 1.78 bounding-box diagonals from the box centre (the whole object fits at 40 deg).
VIEW_OFFSET = (0.6, 0.5, 1.6)
VIEW_FOVY_DEG = 40.0
VIEW_SIZE = 256
MIN_SILHOUETTE_IOU = 0.9

BLENDER_SCRIPT = r"""
import sys
try:
    import numpy
except ImportError:   # started from another Python (pyenv, a venv), Blender takes that one's paths, not Debian's
    sys.path.append("/usr/lib/python3/dist-packages")
    import numpy
# Debian's Blender 3.4 glTF importer still uses numpy.bool, which numpy 1.24 removed (Debian 12
# ships 1.24): without this alias it cannot import any GLB.
if not hasattr(numpy, "bool"):
    numpy.bool = bool
import json, math, bpy, mathutils
args = json.loads(sys.argv[sys.argv.index("--") + 1])
result = {}
for path in (args["obj"], args["glb"]):       # the GLB last: it is the one rendered
    bpy.ops.wm.read_factory_settings(use_empty=True)
    if path.endswith(".glb"):
        bpy.ops.import_scene.gltf(filepath=path)
    else:
        bpy.ops.import_scene.obj(filepath=path)          # defaults: forward -Z, up Y
    meshes = [o for o in bpy.context.scene.objects if o.type == "MESH"]
    corners = [o.matrix_world @ mathutils.Vector(c) for o in meshes for c in o.bound_box]
    textures = [n.image.size[:] for o in meshes for m in o.data.materials if m and m.node_tree
                for n in m.node_tree.nodes if n.type == "TEX_IMAGE" and n.image]
    result[path] = {"min": [min(c[i] for c in corners) for i in range(3)],
                    "max": [max(c[i] for c in corners) for i in range(3)],
                    "uv_layers": sum(len(o.data.uv_layers) for o in meshes), "textures": len(textures),
                    "meshes": len(meshes), "custom_normals": sum(o.data.has_custom_normals for o in meshes)}
print("LIFT3D_RESULT " + json.dumps(result), flush=True)   # before the renders, which may fail on their own
scene = bpy.context.scene
camera = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
camera.location = args["eye"]
look = mathutils.Vector(args["target"]) - mathutils.Vector(args["eye"])
camera.rotation_euler = look.to_track_quat("-Z", "Y").to_euler()     # Blender's camera up: scene +z
camera.data.sensor_fit, camera.data.angle_y = "VERTICAL", math.radians(args["fovy_deg"])
scene.collection.objects.link(camera); scene.camera = camera
scene.render.engine, scene.cycles.samples, scene.cycles.device = "CYCLES", 16, "CPU"
scene.cycles.use_denoising = False
scene.render.resolution_x = scene.render.resolution_y = args["size"]
scene.render.resolution_percentage = 100
scene.render.image_settings.color_mode = "RGBA"
scene.view_settings.view_transform, scene.view_settings.look = "Standard", "None"   # Filmic washes colours out
# The lit screenshot, as a user sees it: a grey world and a sun that together stay below white.
sun = bpy.data.objects.new("sun", bpy.data.lights.new("sun", "SUN")); sun.rotation_euler = (0.6, 0.3, 0.8)
sun.data.energy = 0.7
scene.collection.objects.link(sun)
scene.world = bpy.data.worlds.new("world"); scene.world.color = (0.4, 0.4, 0.4)
scene.render.filepath = args["shot"]
bpy.ops.render.render(write_still=True)
# The surface colour alone, for the pixel comparison: each material's base colour as emission.
for material in bpy.data.materials:
    if not material.use_nodes:
        continue
    nodes, links = material.node_tree.nodes, material.node_tree.links
    output = next((n for n in nodes if n.type == "OUTPUT_MATERIAL"), None)
    bsdf = next((n for n in nodes if n.type == "BSDF_PRINCIPLED"), None)
    if output is None or bsdf is None:
        continue
    emission = nodes.new("ShaderNodeEmission")
    base = bsdf.inputs["Base Color"]
    if base.is_linked:
        links.new(base.links[0].from_socket, emission.inputs["Color"])
    else:
        emission.inputs["Color"].default_value = base.default_value
    links.new(emission.outputs["Emission"], output.inputs["Surface"])
scene.render.film_transparent = True
scene.render.filepath = args["albedo"]
bpy.ops.render.render(write_still=True)
"""

THREE_PAGE = """<!doctype html><html><body style="margin:0"><pre id="result">pending</pre>
<script type="importmap">{"imports": {"three": "./node_modules/three/build/three.module.js",
  "three/addons/": "./node_modules/three/examples/jsm/"}}</script>
<script type="module">
import * as THREE from "three";
import { GLTFLoader } from "three/addons/loaders/GLTFLoader.js";
const VIEW = __VIEW__;
const out = document.getElementById("result");
const renderer = new THREE.WebGLRenderer({ antialias: true, preserveDrawingBuffer: true, alpha: true });
renderer.setPixelRatio(1);
renderer.setSize(VIEW.size, VIEW.size);
document.body.appendChild(renderer.domElement);
const scene = new THREE.Scene();
scene.add(new THREE.HemisphereLight(0xffffff, 0x444444, 2.0));
const sun = new THREE.DirectionalLight(0xffffff, 1.5); sun.position.set(2, 3, 2); scene.add(sun);
const camera = new THREE.PerspectiveCamera(VIEW.fovy_deg, 1, 0.01, 100);   // three.js's default up: +y
camera.position.fromArray(VIEW.eye);
camera.lookAt(new THREE.Vector3().fromArray(VIEW.target));
const lit = new Map(), unlit = new Map();
// A PNG of the canvas: lit on white as a user sees it, or the surface colour alone on transparent.
window.shot = (albedo) => {
  for (const [mesh, material] of (albedo ? unlit : lit)) mesh.material = material;
  scene.background = albedo ? null : new THREE.Color(0xffffff);
  renderer.setClearColor(0x000000, 0);
  renderer.render(scene, camera);
  return renderer.domElement.toDataURL("image/png");
};
new GLTFLoader().load("model.glb", (gltf) => {
  scene.add(gltf.scene);
  const box = new THREE.Box3().setFromObject(gltf.scene);
  let meshes = 0, normals = 0, textured = 0;
  gltf.scene.traverse((o) => { if (!o.isMesh) return;
    meshes++; if (o.geometry.attributes.normal) normals++;
    const m = o.material;
    if (m && m.map && m.map.image) textured++;
    lit.set(o, m);
    unlit.set(o, new THREE.MeshBasicMaterial({ map: m.map, color: m.color, vertexColors: m.vertexColors,
      side: m.side, transparent: m.transparent, alphaTest: m.alphaTest })); });
  out.textContent = JSON.stringify({ min: box.min.toArray(), max: box.max.toArray(), meshes, normals, textured });
}, undefined, (e) => { out.textContent = JSON.stringify({ error: String(e) }); });
</script></body></html>
"""

PUPPETEER_SCRIPT = """
import { writeFileSync } from "node:fs";
const { default: puppeteer } = await import(process.argv[2]);
const browser = await puppeteer.launch({ executablePath: process.argv[3], headless: true,
  args: ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"] });
try {
  const page = await browser.newPage();
  await page.goto(process.argv[4]);
  await page.waitForFunction(() => document.getElementById("result").textContent !== "pending", { timeout: 60000 });
  console.log("LIFT3D_RESULT " + await page.$eval("#result", (e) => e.textContent));
  for (const [albedo, path] of [[false, process.argv[5]], [true, process.argv[6]]]) {
    const url = await page.evaluate((a) => window.shot(a), albedo);
    writeFileSync(path, Buffer.from(url.split(",")[1], "base64"));
  }
} finally { await browser.close(); }
"""


# --------------------------------------------------------------------------- frames and the camera


def world_from_file(path: str) -> np.ndarray:
    """4x4 from the file's coordinates to lift3d's world, as ``lift3d.mesh.io.load_mesh`` applies it."""
    import trimesh

    from lift3d.export import frame

    loaded = trimesh.load(path) if path.lower().endswith((".glb", ".gltf")) else None   # glTF extras name the frame
    matrix = frame.world_from_file(path, loaded)
    return np.eye(4) if matrix is None else np.asarray(matrix, np.float64)


def transform(matrix: np.ndarray, points) -> np.ndarray:
    points = np.asarray(points, np.float64)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def expected_view(world_vertices: np.ndarray, file_to_world: np.ndarray, viewer_from_file: np.ndarray,
                  up: tuple) -> dict:
    """How a viewer that reads the file's coordinates in its own axes should show the mesh: its box,
    and whether the viewer's up is the world's up (+z)."""
    viewer_from_world = np.eye(4)
    viewer_from_world[:3, :3] = viewer_from_file
    viewer_from_world = viewer_from_world @ np.linalg.inv(file_to_world)
    points = transform(viewer_from_world, world_vertices)
    return {"min": points.min(0).tolist(), "max": points.max(0).tolist(),
            "up_is_world_up": bool(np.allclose(viewer_from_world[:3, :3] @ [0.0, 0.0, 1.0], up, atol=1e-6))}


def upright(box: dict, expected: dict, tol: float = 2e-3) -> bool:
    return expected["up_is_world_up"] and all(
        abs(a - b) <= tol for a, b in zip(box["min"] + box["max"], expected["min"] + expected["max"]))


def viewer_camera(world_vertices: np.ndarray, glb_to_world: np.ndarray) -> dict:
    """The viewers' camera in the glTF file's frame (``eye``, ``target``) and in lift3d's world
    (``world_eye``, ``world_target``): the file is the viewers' frame, whatever lift3d's export frame is."""
    file_points = transform(np.linalg.inv(glb_to_world), world_vertices)
    lo, hi = file_points.min(0), file_points.max(0)
    target = (lo + hi) / 2
    eye = target + np.asarray(VIEW_OFFSET) * np.linalg.norm(hi - lo)
    return {"eye": eye.tolist(), "target": target.tolist(), "fovy_deg": VIEW_FOVY_DEG, "size": VIEW_SIZE,
            "world_eye": transform(glb_to_world, eye).tolist(),
            "world_target": transform(glb_to_world, target).tolist()}


def lift3d_render(world_mesh, view: dict) -> np.ndarray:
    """(H, W, 4) float in [0, 1]: lift3d's ray-cast of the world-frame mesh from the viewers' camera
    (surface colour alone, 2x2 rays per pixel for antialiased edges like the viewers')."""
    import torch

    from lift3d.cameras import Cameras, look_at
    from lift3d.mesh.raycast import MeshRaycaster

    c2w = look_at(torch.tensor(view["world_eye"]), torch.tensor(view["world_target"]))     # up: world +z
    cameras = Cameras(c2w, torch.tensor([float(view["fovy_deg"])]), view["size"], view["size"])
    return MeshRaycaster(world_mesh).render(cameras, shading="albedo", samples_per_pixel=4)["rgba"][0].numpy()


def azimuth_elevation(view: dict) -> tuple[float, float]:
    """Where the viewers' camera looks from, in lift3d's spherical angles about the object's centre."""
    d = np.subtract(view["world_eye"], view["world_target"])
    return float(np.degrees(np.arctan2(d[1], d[0])) % 360), float(np.degrees(np.arcsin(d[2] / np.linalg.norm(d))))


# --------------------------------------------------------------------------- pixels


def read_rgba(path: str) -> np.ndarray:
    """(H, W, 4) float in [0, 1] (an RGB file is opaque)."""
    import imageio.v3 as iio

    image = np.asarray(iio.imread(path), np.float64) / 255.0
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, -1)
    if image.shape[-1] == 3:
        image = np.concatenate([image, np.ones_like(image[..., :1])], -1)
    return image


def compare_pixels(viewer: np.ndarray, reference: np.ndarray) -> dict:
    """Silhouette IoU (alpha >= 0.5) of two (H, W, 4) images in [0, 1], and their mean absolute colour
    difference (over RGB, 0-1) where both are opaque."""
    if viewer.shape != reference.shape:
        raise ValueError(f"images differ in size: {viewer.shape} and {reference.shape}")
    a, b = viewer[..., 3] >= 0.5, reference[..., 3] >= 0.5
    union, both = np.logical_or(a, b).sum(), np.logical_and(a, b)
    colour = float(np.abs(viewer[..., :3] - reference[..., :3])[both].mean()) if both.any() else float("nan")
    return {"silhouette_iou": float(both.sum() / union) if union else 0.0, "mean_colour_difference": colour,
            "viewer_pixels": int(a.sum()), "lift3d_pixels": int(b.sum())}


# --------------------------------------------------------------------------- the viewers


def last_result(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith("LIFT3D_RESULT ")]
    if not lines:
        raise RuntimeError(text.strip().splitlines()[-1] if text.strip() else "no output")
    return json.loads(lines[-1][len("LIFT3D_RESULT "):])


def run_blender(glb: str, obj: str, shot: str, albedo: str, view: dict) -> dict:
    blender = shutil.which("blender")
    if not blender:
        return {"missing": "blender is not on PATH (Debian: apt-get install blender)"}
    args = {"glb": glb, "obj": obj, "shot": shot, "albedo": albedo, "fovy_deg": view["fovy_deg"], "size": view["size"],
            "eye": (BLENDER_FROM_FILE @ view["eye"]).tolist(), "target": (BLENDER_FROM_FILE @ view["target"]).tolist()}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(BLENDER_SCRIPT)
    try:
        proc = subprocess.run([blender, "-b", "--factory-startup", "--python", f.name, "--", json.dumps(args)],
                              capture_output=True, text=True, timeout=600)
    finally:
        os.unlink(f.name)
    return last_result(proc.stdout + proc.stderr)


def npm_modules(prefix: str) -> str:
    """``prefix/node_modules`` with three and puppeteer-core (installed with npm when missing)."""
    modules = os.path.join(prefix, "node_modules")
    if not all(os.path.isdir(os.path.join(modules, p.rsplit("@", 1)[0])) for p in NPM_PACKAGES):
        if not shutil.which("npm"):
            raise RuntimeError("npm is not on PATH (Debian: apt-get install npm)")
        os.makedirs(prefix, exist_ok=True)
        subprocess.run(["npm", "install", "--prefix", prefix, "--no-audit", "--no-fund", *NPM_PACKAGES],
                       check=True, capture_output=True, text=True)
    return modules


def run_three(glb: str, shot: str, albedo: str, view: dict, prefix: str) -> dict:
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if not chromium:
        return {"missing": "no Chromium on PATH (Debian: apt-get install chromium)"}
    modules = npm_modules(prefix)
    page_view = {k: view[k] for k in ("eye", "target", "fovy_deg", "size")}       # file frame = three.js's
    with tempfile.TemporaryDirectory() as site:
        os.symlink(modules, os.path.join(site, "node_modules"))
        shutil.copy(glb, os.path.join(site, "model.glb"))
        with open(os.path.join(site, "index.html"), "w") as f:
            f.write(THREE_PAGE.replace("__VIEW__", json.dumps(page_view)))
        with open(os.path.join(site, "check.mjs"), "w") as f:
            f.write(PUPPETEER_SCRIPT)
        handler = functools.partial(QuietHandler, directory=site)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            entry = os.path.join(modules, "puppeteer-core", "lib", "esm", "puppeteer", "puppeteer-core.js")
            url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
            proc = subprocess.run(["node", os.path.join(site, "check.mjs"), entry, chromium, url, shot, albedo],
                                  capture_output=True, text=True, timeout=300)
        finally:
            server.shutdown()
    return last_result(proc.stdout + proc.stderr)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# --------------------------------------------------------------------------- the report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("export_dir", help="a trial's export folder (model.glb, model.obj)")
    p.add_argument("--out", default="", help="where the screenshots go (default: the export folder)")
    p.add_argument("--three", default=os.path.join(os.path.expanduser("~"), ".cache", "lift3d", "viewers"),
                   help="npm prefix holding three and puppeteer-core")
    p.add_argument("--min-iou", type=float, default=MIN_SILHOUETTE_IOU,
                   help="the lowest silhouette IoU against lift3d's render that passes")
    args = p.parse_args(argv)
    import imageio.v3 as iio

    from lift3d.mesh.io import load_mesh

    glb, obj = (os.path.join(args.export_dir, f"model.{e}") for e in ("glb", "obj"))
    for path in (glb, obj):
        if not os.path.isfile(path):
            print(f"error: {path} not found; give a trial's export folder", file=sys.stderr)
            return 2
    out = args.out or args.export_dir
    os.makedirs(out, exist_ok=True)
    shots = {name: os.path.join(out, f"{name}.png") for name in ("blender", "blender-albedo", "threejs",
                                                                 "threejs-albedo", "lift3d")}
    for shot in shots.values():      # a stale screenshot must not stand in for a render that failed
        if os.path.exists(shot):
            os.remove(shot)
    world = load_mesh(glb)
    vertices = np.asarray(world.vertices)
    to_world = {path: world_from_file(path) for path in (glb, obj)}
    view = viewer_camera(vertices, to_world[glb])
    print(f"world frame (z up) box of {glb}: min {fmt(vertices.min(0))} max {fmt(vertices.max(0))}")
    print("viewers' camera: glTF front (+z), right and above, fovy {:g} deg = lift3d azimuth {:.0f} deg, elevation "
          "{:.0f} deg about the object's centre (the input view is azimuth 0)".format(VIEW_FOVY_DEG,
                                                                                     *azimuth_elevation(view)))
    print("| viewer | file | box min | box max | upright | normals | texture |")
    print("|---|---|---|---|---|---|---|")
    try:
        blender = run_blender(glb, obj, shots["blender"], shots["blender-albedo"], view)
    except (RuntimeError, subprocess.SubprocessError) as e:
        blender = {"error": str(e)}
    ok = True
    for path in (glb, obj):
        expected = expected_view(vertices, to_world[path], BLENDER_FROM_FILE, VIEWER_UP["blender"])
        ok &= row(f"Blender {bpy_version()}", path, blender.get(path), blender, expected,
                  normals=lambda r: f"{r['custom_normals']}/{r['meshes']} meshes with the file's normals",
                  texture=lambda r: f"{r['textures']} image, {r['uv_layers']} UV layer")
    try:
        three = run_three(glb, shots["threejs"], shots["threejs-albedo"], view, args.three)
    except (RuntimeError, subprocess.SubprocessError) as e:
        three = {"error": str(e)}
    expected = expected_view(vertices, to_world[glb], THREE_FROM_FILE, VIEWER_UP["three.js"])
    ok &= row("three.js (Chromium)", glb, three if "min" in three else None, three, expected,
              normals=lambda r: f"{r['normals']}/{r['meshes']} meshes",
              texture=lambda r: f"{r['textured']}/{r['meshes']} meshes")

    reference = lift3d_render(world, view)
    iio.imwrite(shots["lift3d"], (np.clip(reference, 0, 1) * 255).round().astype(np.uint8))
    print(f"\npixels against lift3d's own render of {os.path.basename(glb)} from the same camera ({shots['lift3d']}):")
    print("| viewer | silhouette IoU | mean colour difference | passes |")
    print("|---|---|---|---|")
    for viewer, status, loaded, shot in (("Blender", blender, glb in blender, shots["blender-albedo"]),
                                         ("three.js", three, "min" in three, shots["threejs-albedo"])):
        if not (loaded and os.path.isfile(shot)):
            why = status.get("missing") or status.get("error") or "no screenshot"
            print(f"| {viewer} | not compared: {why} | | |")
            continue
        score = compare_pixels(read_rgba(shot), reference)
        passes = score["silhouette_iou"] >= args.min_iou
        ok &= passes
        print(f"| {viewer} | {score['silhouette_iou']:.3f} | {255 * score['mean_colour_difference']:.1f} / 255 | "
              f"{'yes' if passes else f'NO (IoU < {args.min_iou:g})'} |")
    print(f"screenshots: {', '.join(shots.values())}")
    return 0 if ok else 1


def fmt(values) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def bpy_version() -> str:
    try:
        text = subprocess.run(["blender", "--version"], capture_output=True, text=True, timeout=60).stdout
        return text.split()[1]
    except (OSError, IndexError, subprocess.SubprocessError):
        return ""


def row(viewer, path, box, status, expected, normals, texture) -> bool:
    """One table row; False when the viewer showed the file and it is not upright."""
    name = os.path.basename(path)
    if box is None:
        why = status.get("missing") or status.get("error") or "no result"
        print(f"| {viewer} | {name} | not checked: {why} | | | | |")
        return True
    good = upright(box, expected)
    print(f"| {viewer} | {name} | {fmt(box['min'])} | {fmt(box['max'])} | {'yes' if good else 'NO'} | "
          f"{normals(box)} | {texture(box)} |")
    return good


if __name__ == "__main__":
    sys.exit(main())
