"""Open an export in Blender and in three.js as a user would, and say whether it stands upright.

    python benchmarks/check_in_viewers.py TRIAL/export [--out DIR]

- **Blender** (``blender`` on PATH; Debian's ``blender`` package works) in background mode imports
  ``model.glb`` and ``model.obj`` with its default importers, prints each object's bounding box in
  Blender's z-up scene and renders the GLB with Cycles from the reference view's side.
- **three.js** (headless Chromium driven by puppeteer-core; ``three`` and ``puppeteer-core`` are
  installed with npm into ``--three`` when missing) loads ``model.glb`` with ``GLTFLoader``, prints
  its bounding box in three.js's y-up scene, whether it has normals and a texture, and takes a
  screenshot with three.js's default camera up (+y).

"Upright" means the viewer's bounding box is the world frame's (``lift3d.mesh.io.load_mesh``, z up)
mapped to the viewer's convention: Blender's world is z-up, so its box equals the world box;
three.js is y-up, so its box is world (x, z, -y). A viewer that is missing is reported, not an error.
The screenshots go to ``--out`` (default: the export folder).
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NPM_PACKAGES = ("three@0.170.0", "puppeteer-core@23")

BLENDER_SCRIPT = r"""
import sys
# Debian's Blender 3.4 runs the system Python; its glTF add-on needs Debian's numpy and still uses
# numpy.bool, an alias numpy 1.24 removed.
sys.path.insert(0, "/usr/lib/python3/dist-packages")
import numpy
if not hasattr(numpy, "bool"):
    numpy.bool = bool
import json, math, bpy, mathutils
glb, obj, shot = sys.argv[sys.argv.index("--") + 1:]
result = {}
for path in (obj, glb):       # the GLB last: it is the one rendered
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
print("LIFT3D_RESULT " + json.dumps(result), flush=True)   # before the render, which may fail on its own
scene = bpy.context.scene
lo, hi = mathutils.Vector(result[glb]["min"]), mathutils.Vector(result[glb]["max"])
centre, size = (lo + hi) / 2, (hi - lo).length
target = bpy.data.objects.new("target", None); target.location = centre; scene.collection.objects.link(target)
camera = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
camera.location = centre + mathutils.Vector((1.6, 0.6, 0.5)) * size     # world +x: the reference side
track = camera.constraints.new("TRACK_TO"); track.target = target
track.track_axis, track.up_axis = "TRACK_NEGATIVE_Z", "UP_Y"
scene.collection.objects.link(camera); scene.camera = camera
sun = bpy.data.objects.new("sun", bpy.data.lights.new("sun", "SUN")); sun.rotation_euler = (0.6, 0.3, 0.8)
scene.collection.objects.link(sun)
scene.world = bpy.data.worlds.new("world"); scene.world.color = (1, 1, 1)
scene.render.engine, scene.cycles.samples, scene.cycles.device = "CYCLES", 16, "CPU"
scene.cycles.use_denoising = False
scene.render.resolution_x = scene.render.resolution_y = 256
scene.render.filepath = shot
bpy.ops.render.render(write_still=True)
"""

THREE_PAGE = """<!doctype html><html><body style="margin:0"><pre id="result">pending</pre>
<script type="importmap">{"imports": {"three": "./node_modules/three/build/three.module.js",
  "three/addons/": "./node_modules/three/examples/jsm/"}}</script>
<script type="module">
import * as THREE from "three";
import { GLTFLoader } from "three/addons/loaders/GLTFLoader.js";
const out = document.getElementById("result");
const renderer = new THREE.WebGLRenderer({ antialias: true, preserveDrawingBuffer: true });
renderer.setSize(384, 384);
document.body.appendChild(renderer.domElement);
const scene = new THREE.Scene();
scene.background = new THREE.Color(0xffffff);
scene.add(new THREE.HemisphereLight(0xffffff, 0x444444, 2.0));
const sun = new THREE.DirectionalLight(0xffffff, 1.5); sun.position.set(2, 3, 2); scene.add(sun);
new GLTFLoader().load("model.glb", (gltf) => {
  scene.add(gltf.scene);
  const box = new THREE.Box3().setFromObject(gltf.scene);
  let meshes = 0, normals = 0, textured = 0;
  gltf.scene.traverse((o) => { if (o.isMesh) { meshes++; if (o.geometry.attributes.normal) normals++;
    if (o.material && o.material.map && o.material.map.image) textured++; } });
  const c = box.getCenter(new THREE.Vector3()), r = box.getSize(new THREE.Vector3()).length();
  const camera = new THREE.PerspectiveCamera(40, 1, 0.01, 100);     // three.js's default up: +y
  camera.position.set(c.x + 1.6 * r, c.y + 0.5 * r, c.z - 0.6 * r);  // world (1.6, 0.6, 0.5): as in Blender
  camera.lookAt(c);
  renderer.render(scene, camera);
  out.textContent = JSON.stringify({ min: box.min.toArray(), max: box.max.toArray(), meshes, normals, textured });
}, undefined, (e) => { out.textContent = JSON.stringify({ error: String(e) }); });
</script></body></html>
"""

PUPPETEER_SCRIPT = """
const { default: puppeteer } = await import(process.argv[2]);
const browser = await puppeteer.launch({ executablePath: process.argv[3], headless: true,
  args: ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"] });
try {
  const page = await browser.newPage();
  await page.goto(process.argv[4]);
  await page.waitForFunction(() => document.getElementById("result").textContent !== "pending", { timeout: 60000 });
  console.log("LIFT3D_RESULT " + await page.$eval("#result", (e) => e.textContent));
  await (await page.$("canvas")).screenshot({ path: process.argv[5] });
} finally { await browser.close(); }
"""


def world_box(path: str) -> tuple[list, list]:
    from lift3d.mesh.io import load_mesh

    mesh = load_mesh(path)
    return mesh.bounds[0].tolist(), mesh.bounds[1].tolist()


def expected_boxes(lo: list, hi: list) -> dict:
    """The world (z-up) box as each viewer should show it."""
    return {"blender": (lo, hi), "three.js": ([lo[0], lo[2], -hi[1]], [hi[0], hi[2], -lo[1]])}


def upright(box: dict, expected: tuple, tol: float = 2e-3) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(box["min"] + box["max"], expected[0] + expected[1]))


def last_result(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith("LIFT3D_RESULT ")]
    if not lines:
        raise RuntimeError(text.strip().splitlines()[-1] if text.strip() else "no output")
    return json.loads(lines[-1][len("LIFT3D_RESULT "):])


def run_blender(glb: str, obj: str, shot: str) -> dict:
    blender = shutil.which("blender")
    if not blender:
        return {"missing": "blender is not on PATH (Debian: apt-get install blender)"}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(BLENDER_SCRIPT)
    try:
        proc = subprocess.run([blender, "-b", "--factory-startup", "--python", f.name, "--", glb, obj, shot],
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


def run_three(glb: str, shot: str, prefix: str) -> dict:
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if not chromium:
        return {"missing": "no Chromium on PATH (Debian: apt-get install chromium)"}
    modules = npm_modules(prefix)
    with tempfile.TemporaryDirectory() as site:
        os.symlink(modules, os.path.join(site, "node_modules"))
        shutil.copy(glb, os.path.join(site, "model.glb"))
        with open(os.path.join(site, "index.html"), "w") as f:
            f.write(THREE_PAGE)
        with open(os.path.join(site, "check.mjs"), "w") as f:
            f.write(PUPPETEER_SCRIPT)
        handler = functools.partial(QuietHandler, directory=site)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            entry = os.path.join(modules, "puppeteer-core", "lib", "esm", "puppeteer", "puppeteer-core.js")
            url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
            proc = subprocess.run(["node", os.path.join(site, "check.mjs"), entry, chromium, url, shot],
                                  capture_output=True, text=True, timeout=300)
        finally:
            server.shutdown()
    return last_result(proc.stdout + proc.stderr)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("export_dir", help="a trial's export folder (model.glb, model.obj)")
    p.add_argument("--out", default="", help="where the screenshots go (default: the export folder)")
    p.add_argument("--three", default=os.path.join(os.path.expanduser("~"), ".cache", "lift3d", "viewers"),
                   help="npm prefix holding three and puppeteer-core")
    args = p.parse_args()
    glb, obj = (os.path.join(args.export_dir, f"model.{e}") for e in ("glb", "obj"))
    for path in (glb, obj):
        if not os.path.isfile(path):
            print(f"error: {path} not found; give a trial's export folder", file=sys.stderr)
            return 2
    out = args.out or args.export_dir
    os.makedirs(out, exist_ok=True)
    expected = expected_boxes(*world_box(glb))
    print(f"world frame (z up) box of {glb}: min {fmt(expected['blender'][0])} max {fmt(expected['blender'][1])}")
    print("| viewer | file | box min | box max | upright | normals | texture |")
    print("|---|---|---|---|---|---|---|")
    try:
        blender = run_blender(glb, obj, os.path.join(out, "blender.png"))
    except (RuntimeError, subprocess.SubprocessError) as e:
        blender = {"error": str(e)}
    for path in (glb, obj):
        row(f"Blender {bpy_version()}", path, blender.get(path), blender, expected["blender"],
            normals=lambda r: f"{r['custom_normals']}/{r['meshes']} meshes with the file's normals",
            texture=lambda r: f"{r['textures']} image, {r['uv_layers']} UV layer")
    try:
        three = run_three(glb, os.path.join(out, "threejs.png"), args.three)
    except (RuntimeError, subprocess.SubprocessError) as e:
        three = {"error": str(e)}
    row("three.js (Chromium)", glb, three if "min" in three else None, three, expected["three.js"],
        normals=lambda r: f"{r['normals']}/{r['meshes']} meshes",
        texture=lambda r: f"{r['textured']}/{r['meshes']} meshes")
    print(f"screenshots: {os.path.join(out, 'blender.png')}, {os.path.join(out, 'threejs.png')}")
    return 0


def fmt(values) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def bpy_version() -> str:
    try:
        text = subprocess.run(["blender", "--version"], capture_output=True, text=True, timeout=60).stdout
        return text.split()[1]
    except (OSError, IndexError, subprocess.SubprocessError):
        return ""


def row(viewer, path, box, status, expected, normals, texture) -> None:
    name = os.path.basename(path)
    if box is None:
        why = status.get("missing") or status.get("error") or "no result"
        print(f"| {viewer} | {name} | not checked: {why} | | | | |")
        return
    print(f"| {viewer} | {name} | {fmt(box['min'])} | {fmt(box['max'])} | "
          f"{'yes' if upright(box, expected) else 'NO'} | {normals(box)} | {texture(box)} |")


if __name__ == "__main__":
    sys.exit(main())
