"""The image-to-3D system: a 3D field fitted to one reference image under a guidance.

Every training step has two parts (threestudio's "accumulate" mode):
1. the reference view: render it and match the image (``rgb``, ``mask``, ``depth_smooth_ref``);
2. guidance views: render random views, score them with the guidance (``guidance``), and
   regularise them (``near_view``, ``depth_smooth``, ``normal_smooth``, ``orient``, ``sparsity``,
   ``opaque``).
Each ``loss_x`` is weighted by ``system.loss.lambda_x`` (any of them may be a schedule); a term
whose weight is 0 is not computed at all. Plugins add terms of their own through the ``losses(ctx)``
hook (lift3d/plugin.py), declared in their ``loss_defaults``; ``system.loss`` accepts exactly the
built-in names and the declared ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import ListConfig

from lift3d.cameras import Cameras, look_at
from lift3d.config import (LOSS_WEIGHT, C, check_schedule, domain, schedulable, schedule_values,
                           unknown_key_message)
from lift3d.errors import ConfigError, UserError
from lift3d.export.mesh import ExportConfig, check_export_config
from lift3d.guidance.base import GuidanceContext
from lift3d.plugin import OptimizerOps, StepContext
from lift3d.registry import find, register
from lift3d.systems import losses
from lift3d.systems.base import BaseSystem, RunContext
from lift3d.utils import figures
from lift3d.utils.images import resize


@dataclass
class LossConfig:
    """The system's own loss weights (``system.loss``; plugins declare more in ``loss_defaults``)."""
    lambda_guidance: Any = schedulable(1.0, ge=0)
    lambda_rgb: Any = schedulable(0.0, ge=0)
    lambda_mask: Any = schedulable(0.0, ge=0)
    lambda_depth_smooth_ref: Any = schedulable(0.0, ge=0)
    lambda_depth_smooth: Any = schedulable(0.0, ge=0)
    lambda_near_view: Any = schedulable(0.0, ge=0)
    lambda_normal_smooth: Any = schedulable(0.0, ge=0)
    lambda_orient: Any = schedulable(0.0, ge=0)
    lambda_sparsity: Any = schedulable(0.0, ge=0)
    lambda_opaque: Any = schedulable(0.0, ge=0)


@dataclass
class OptimizerConfig:
    name: str = "adam"                      # adam | adamw | adamax
    lr: float = domain(0.01, gt=0)
    betas: list = domain([0.9, 0.99], ge=0, lt=1, length=2)
    eps: float = domain(1e-15, ge=0)
    weight_decay: float = domain(0.0, ge=0)


REFERENCE_BACKGROUNDS = ("random", "white")
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adamax": torch.optim.Adamax}


@register("image-to-3d", "system")
class ImageTo3D(BaseSystem):
    @dataclass
    class Config:
        geometry_type: str = "voxel-rf"
        geometry: dict = field(default_factory=dict)
        background_type: str = "solid-color"
        background: dict = field(default_factory=dict)
        renderer_type: str = "volume-renderer"
        renderer: dict = field(default_factory=dict)
        guidance_type: Optional[str] = None
        guidance: dict = field(default_factory=dict)
        loss: dict = field(default_factory=dict)      # lambda_<name>: LossConfig's and the plugins' loss_defaults
        optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
        export: ExportConfig = field(default_factory=ExportConfig)
        near_view_offset: float = domain(0.05, ge=0)  # eye displacement of the near view (world units)
        # Render the reference view on every s-th pixel row and column, at a random phase each step:
        # 1/s^2 of its rays per step, every pixel once per s^2 steps on average. (RGB fields only.)
        reference_stride: int = domain(1, ge=1)
        # The reference view's background while training: "white" is the input as shown; "random" draws one colour
        # per step and composites the input on it, so the field cannot make a white part of the object out of
        # empty space in front of a white background. With the mini prior random costs geometry (bundled set,
        # mean Chamfer / IoU 0.0584 / 0.306 against 0.0552 / 0.314: benchmarks/RESULTS.md, issue 22); the
        # export closes the holes white leaves (system.export.fit_mask). A latent field renders its own.
        reference_background: str = "white"
        # With several photos (data.image_paths): how many of them are rendered and scored each step (0: all),
        # a random pick without repeats each step; each is scored as the one photo is (the same lambda_rgb/mask,
        # averaged over the photos rendered).
        reference_views_per_step: int = domain(0, ge=0)

    def __init__(self, cfg: Any = None, path: str = "system"):
        super().__init__(cfg, path)
        c = self.cfg
        self.geometry = find(c.geometry_type, "geometry")(c.geometry, path=f"{path}.geometry")
        self.background = find(c.background_type, "background")(c.background, path=f"{path}.background")
        # The renderer keeps references to geometry and background without owning them twice.
        self.renderer = find(c.renderer_type, "renderer")(c.renderer, geometry=self.geometry,
                                                          background=self.background, path=f"{path}.renderer")
        self.guidance = None  # built by prepare_guidance: --test and --export never load it
        self.guidance_state = None   # the guidance's trainable module, when it has one (checkpointed)
        self._step_context: Optional[StepContext] = None
        self.loss_weights = self._loss_weights(c.loss, f"{path}.loss")
        check_export_config(c.export)      # its choices fail now, not after training
        if c.reference_background not in REFERENCE_BACKGROUNDS:
            raise ConfigError(f"{path}.reference_background must be one of {', '.join(REFERENCE_BACKGROUNDS)}, "
                              f"got '{c.reference_background}'")
        if c.reference_stride < 1 or (c.reference_stride > 1 and self.latent_field):
            raise ConfigError(f"{path}.reference_stride must be a whole number >= 1 (and 1 for a latent field, "
                              f"whose reference render is decoded as a whole), got {c.reference_stride}")

    def _loss_weights(self, given, path: str) -> dict:
        """{name: weight or schedule} for every loss term: LossConfig's and those the plugins declare."""
        guidance = find(self.cfg.guidance_type, "guidance") if self.cfg.guidance_type else None
        defaults = {f.name[len("lambda_"):]: f.default for f in dataclasses.fields(LossConfig)}
        declared = [getattr(part, "loss_defaults", {}) for part in (self.geometry, self.background, self.renderer)]
        if guidance is not None:   # a guidance's terms may depend on its config (a method's own, VSD's LoRA)
            declared.append(guidance.declared_losses(self.cfg.guidance, "system.guidance"))
        for losses_of_part in declared:
            for name, value in losses_of_part.items():
                defaults.setdefault(name, value)
        weights = dict(defaults)
        for key, value in (given or {}).items():
            key = str(key)
            name = key[len("lambda_"):] if key.startswith("lambda_") else None
            if name not in defaults:
                raise ConfigError(unknown_key_message(path, key, [f"lambda_{n}" for n in defaults]))
            value = list(value) if isinstance(value, (list, tuple, ListConfig)) else value
            check_schedule(value, f"{path}.{key}")
            if any(LOSS_WEIGHT.problem(v) for v in schedule_values(value)):
                raise ConfigError(f"{path}.{key} must be {LOSS_WEIGHT.describe()} (a weight), got {value}")
            weights[name] = value
        return weights

    def plugins(self) -> list:
        """Every part whose hooks run each step (lift3d/plugin.py), in order."""
        parts = [self.geometry, self.background, self.renderer, self.guidance]
        return [p for p in parts if p is not None]

    # ------------------------------------------------------------------ setup

    @property
    def latent_field(self) -> bool:
        return self.geometry.n_feature_dims == 4

    @property
    def reference(self):
        """The primary photo (a ReferenceView): its camera is the run's input camera."""
        return self.data.reference_view()

    @property
    def references(self) -> list:
        """Every photo (ReferenceViews), the primary first; one for a single-photo run."""
        views = getattr(self.data, "reference_views", None)
        return views() if views is not None else [self.reference]

    def reference_batch(self, data) -> int:
        """The reference views rendered per step with ``data`` (known before any image loads: its cameras)."""
        n = len(getattr(data, "cameras", None) or [None])
        k = self.cfg.reference_views_per_step
        return min(k, n) if k else n

    def setup(self, data, context: RunContext, train: bool) -> None:
        super().setup(data, context, train)
        if train:
            stride, camera = self.cfg.reference_stride, self.reference.camera
            if camera.height % stride or camera.width % stride:
                raise ConfigError(f"system.reference_stride={stride} does not divide the reference size "
                                  f"{camera.height}x{camera.width}; pick a divisor or change "
                                  f"data.reference_height/width")
            self.prepare_guidance(GuidanceContext(device=context.device, trial_dir=context.trial_dir,
                                                  gt_mesh=data.gt_mesh, seed=context.seed))

    def prepare_guidance(self, context: GuidanceContext) -> None:
        if self.cfg.guidance_type is None:
            if self.latent_field:
                raise UserError("a latent (4-channel) field needs a guidance to decode it; set system.guidance_type")
            return
        reference = self.reference
        guidance = find(self.cfg.guidance_type, "guidance")(self.cfg.guidance, path="system.guidance")
        # Check the colour space before prepare(), which may load a large model.
        space = getattr(guidance, "render_space", "rgb")
        wanted = "latent" if self.latent_field else "rgb"
        if space not in ("auto", wanted):
            raise UserError(f"system.geometry has {self.geometry.n_feature_dims} feature channels but guidance "
                            f"'{self.cfg.guidance_type}' works on {space} renders; set "
                            f"system.geometry.n_feature_dims={4 if space == 'latent' else 3}")
        references = self.references
        guidance.prepare(references if len(references) > 1 else reference, context)   # reference_list() reads both
        self.guidance = guidance
        self.guidance_state = guidance.trainable_state()   # a child module: checkpointed with the field

    def configure_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optimizer
        if o.name not in OPTIMIZERS:
            raise UserError(f"system.optimizer.name '{o.name}' is unknown; use one of {', '.join(OPTIMIZERS)}")
        if not o.lr > 0:
            raise UserError(f"system.optimizer.lr must be a positive number, got {o.lr}")
        groups = [group for part in self.plugins() for group in part.param_groups(o.lr)]
        kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        return OPTIMIZERS[o.name](groups, **kwargs)

    def update_step(self, step: int) -> None:
        for part in self.plugins():
            part.update_step(step)

    def on_after_backward(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        ctx = self._step_context or StepContext(step=step)
        ctx.optimizer = OptimizerOps(optimizer)
        for part in self.plugins():
            part.after_backward(ctx)
        self._step_context = None     # the renders are not kept past the step

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.guidance_state is None:   # --test and --export do not load the guidance or its state
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("guidance_state.")}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ rendering

    def render(self, cameras: Cameras, bg_color=None, normals: bool = False) -> dict:
        return self.renderer(cameras, bg_color=bg_color, normals=normals)

    def to_rgb(self, images: torch.Tensor) -> torch.Tensor:
        """Rendered features (B,H,W,C) -> RGB in [0, 1]; latent fields go through the guidance's decoder."""
        if not self.latent_field:
            return images
        if self.guidance is None:
            raise UserError("rendering a latent field to RGB needs its guidance model; run with --train or set "
                            "system.guidance_type")
        return self.guidance.decode_features(images)

    @torch.no_grad()
    def render_views(self, cameras: Cameras, chunk: int = 4, panels: bool = False, opacity: bool = False):
        """RGB images (H,W,3) for evaluation, a few views at a time to bound memory. With ``panels``,
        {"rgb", "normal", "depth", "opacity"}: (B,H,W,3) batches (see lift3d.utils.figures); with
        ``opacity``, {"rgb", "alpha"}: the RGB and the (B,H,W,1) opacity at its size."""
        was_training = self.training
        self.eval()
        parts = []
        for i in range(0, len(cameras), chunk):
            out = self.render(cameras[i:i + chunk], normals=panels)
            part = {"rgb": self.to_rgb(out["comp_rgb"]).clamp(0, 1)}
            size = part["rgb"].shape[1:3]   # a latent field's decoded RGB is larger than its render
            if opacity:
                part["alpha"] = resize(out["opacity"], size, channels_last=True).clamp(0, 1)
            if panels:
                part.update({k: resize(v, size, channels_last=True) for k, v in (
                    ("normal", figures.normal_image(out["comp_normal"], out["opacity"])),
                    ("depth", figures.depth_image(out["depth"], out["opacity"], self._background_depth)),
                    ("opacity", figures.opacity_image(out["opacity"])))})
            parts.append({k: v.cpu() for k, v in part.items()})
        self.train(was_training)
        batches = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return batches if panels or opacity else list(batches["rgb"])

    # ------------------------------------------------------------------ training

    def reference_camera(self) -> Cameras:
        """The reference camera at the size the field renders it: a latent field renders latents."""
        camera = self.reference.camera
        if self.latent_field:
            f = self.guidance.latent_factor if self.guidance is not None else 1
            camera = camera.with_size(camera.height // f, camera.width // f)
        return camera.to(self.device)

    def reference_cameras(self, indices=None) -> Cameras:
        """The cameras of the photos ``indices`` (default: all) at the size the field renders them."""
        references = self.references
        indices = range(len(references)) if indices is None else indices
        camera = Cameras.cat([references[int(i)].camera for i in indices])
        if self.latent_field:
            f = self.guidance.latent_factor if self.guidance is not None else 1
            camera = camera.with_size(camera.height // f, camera.width // f)
        return camera.to(self.device)

    def _reference_pixels(self):
        """(this step's reference cameras, a function giving the matching pixels of the photos' images on the
        device: (H, W, C) per photo -> (V, h, w, C)). One photo: its camera; several: all of them, or
        ``reference_views_per_step`` drawn at random."""
        references, k = self.references, self.cfg.reference_views_per_step
        if len(references) == 1:
            camera, pick = self.reference_camera(), [0]
        else:
            pick = torch.randperm(len(references))[:k].tolist() if 0 < k < len(references) else list(range(len(references)))
            camera = self.reference_cameras(pick)
        stack = lambda images: torch.stack([images[i] for i in pick])       # noqa: E731
        stride = self.cfg.reference_stride
        if stride == 1:
            return camera, lambda images: stack(images).to(self.device)
        row, col = torch.randint(stride, (2,)).tolist()
        return camera.strided(stride, row, col), lambda images: stack(images)[:, row::stride, col::stride].to(self.device)

    def training_step(self, views: Cameras, step: int) -> dict:
        """Compute every weighted loss for one step. Returns {"loss": total, "loss_x": raw, ...}."""
        if self.guidance is not None:
            views = self.guidance.views(views)
        w = {name: C(v, step) for name, v in self.loss_weights.items()}
        ctx = self._step_context = StepContext(step=step, views=views, weights=w, render=self.render)
        terms: dict[str, torch.Tensor] = {}
        logs: dict[str, float] = {}

        # 1. Reference view. A latent field renders at latent resolution and is decoded to RGB.
        if w["rgb"] or w["mask"] or w["depth_smooth_ref"]:
            camera, pixels = self._reference_pixels()
            bg = self._reference_background()
            out = ctx.outputs["reference"] = self.render(camera, bg_color=bg)
            # The targets at the render's size: the mask at the opacity's, the colour at the decoded RGB's.
            ctx.reference_mask = resize(pixels([r.mask for r in self.references]), out["opacity"].shape[1:3],
                                        mode="area", channels_last=True)
            if w["rgb"]:
                rgb = self.to_rgb(out["comp_rgb"])
                ctx.reference_rgb = self._reference_target(pixels, rgb.shape[1:3], bg)
                terms["rgb"] = losses.masked_rgb_mse(rgb, ctx.reference_rgb)
            if w["mask"]:
                terms["mask"] = losses.mask_mse(out["opacity"], ctx.reference_mask)
            if w["depth_smooth_ref"]:
                terms["depth_smooth_ref"] = losses.depth_smoothness(out["depth"])

        # 2. Guidance views.
        need_normals = bool(w["normal_smooth"] or w["orient"])
        out = ctx.outputs["guidance"] = self.render(views, normals=need_normals)
        if self.guidance is not None and w["guidance"]:
            guided = self.guidance(out, views, step)
            terms["guidance"] = guided.pop("loss_guidance")
            logs.update({k: float(v) for k, v in guided.items()})
        if w["near_view"]:
            near = self.render(_nudged(views, self.cfg.near_view_offset))
            terms["near_view"] = losses.near_view_consistency(out["comp_rgb"], out["depth"],
                                                              near["comp_rgb"], near["depth"])
        if w["depth_smooth"]:
            terms["depth_smooth"] = losses.depth_smoothness(out["depth"])
        if w["normal_smooth"]:
            terms["normal_smooth"] = losses.normal_smoothness(out["comp_normal"])
        if w["orient"]:
            _, dirs = views.rays()
            terms["orient"] = losses.orientation(out["comp_normal"] * 2 - 1, out["opacity"], dirs)
        if w["sparsity"]:
            terms["sparsity"] = losses.sparsity(out["opacity"])
        if w["opaque"]:
            terms["opaque"] = losses.opaque(out["opacity"])

        # 3. The plugins' own terms (their losses(ctx) hook), while any of their weights is on.
        for part in self.plugins():
            declared = getattr(part, "loss_defaults", {})
            if not any(w[name] for name in declared):
                continue
            for name, value in part.losses(ctx).items():
                if name not in declared:
                    raise TypeError(f"{type(part).__name__}.losses returned '{name}', which its loss_defaults "
                                    f"do not declare ({', '.join(declared) or 'none'})")
                if w[name]:
                    terms[name] = value

        total = sum(w[name] * value for name, value in terms.items())
        result = {"loss": total}
        result.update({f"loss_{name}": value.detach() for name, value in terms.items()})
        result.update(logs)
        return result

    def _reference_target(self, pixels, size, bg) -> torch.Tensor:
        """(V, H, W, 3): the photos composited on the reference render's background ``bg`` (None: white) at
        ``size``, premultiplied before resizing (the colour of fully transparent pixels is meaningless)."""
        references = self.references
        alpha = pixels([r.mask for r in references])
        premultiplied = torch.cat([pixels([r.rgba[..., :3] for r in references]) * alpha, alpha], -1)
        rgba = resize(premultiplied, size, mode="area", channels_last=True)
        on = bg if bg is not None else torch.ones(3, device=rgba.device)
        return rgba[..., :3] + on * (1 - rgba[..., 3:])

    # ------------------------------------------------------------------ what the runner shows and writes

    def validation_images(self) -> list:
        """Input, reference-view render, the data module's validation views, the guidance's extras."""
        reference = self.reference
        size = reference.rgb.shape[:2]
        cameras = self.data.val_views()
        renders = self.render_views(cameras.to(self.device))
        ref = self.render_views(self.reference_camera())
        extra = self.guidance.validation_images() if self.guidance is not None else []
        others = []
        for i, other in enumerate(self.references[1:], start=2):     # the other photos and the field from their cameras
            others += [(f"input {i}", _fit(other.rgb, size)), (f"reference {i}", _fit(self.render_views(
                self.reference_cameras([i - 1]))[0], size))]
        return ([("input", reference.rgb), ("reference", _fit(ref[0], size))] + others
                + [(_azimuth(cameras, i), _fit(r, size)) for i, r in enumerate(renders)]
                + [(f"guidance {i}", _fit(e, size)) for i, e in enumerate(extra)])

    def test_frames(self) -> list:
        """Turntable frames: the field's RGB, the exported mesh textured and shaded (when there is one),
        the field's normals and opacity, side by side."""
        cameras = self.data.test_views()
        p = self.render_views(cameras.to(self.device), panels=True)
        mesh = self._mesh_panels(cameras.with_size(*p["rgb"].shape[1:3]))
        columns = [p["rgb"], *mesh, p["normal"], p["opacity"]]
        return list(torch.cat(columns, dim=2))

    def _mesh_panels(self, cameras: Cameras) -> list:
        """[textured, shaded] renders of the exported mesh (the GLB a viewer opens), or [] before export."""
        path = (self.exported or {}).get("glb") or (self.exported or {}).get("obj")
        if not path:
            return []
        from lift3d.export.preview import mesh_panels

        panels = mesh_panels(path, cameras)
        return [panels["textured"], panels["shaded"]]

    def summary_images(self) -> list:
        """Rows of (label, image) at the eval size (decoded, for a latent field): the input, then the
        reference view and the validation views as the field renders them (RGB, normals, depth, opacity)
        and as the exported mesh shows them (textured, shaded). A validation view that is the input's own
        camera is not repeated. With several photos, each photo's camera follows the input's, and a last row
        shows those photos."""
        photos = self.references
        cameras = self.data.val_views()
        cameras = cameras[[i for i in range(len(cameras))
                           if not any(_same_view(cameras[i], p.camera) for p in photos)]]
        ref = self.render_views(self.reference_cameras(), panels=True)
        views = self.render_views(cameras.to(self.device), panels=True) if len(cameras) else None
        size = ref["rgb"].shape[1:3]               # a latent field's: the decoded size
        labels = (["input camera"] + [f"photo {i} camera" for i in range(2, len(photos) + 1)]
                  + [_azimuth(cameras, i) for i in range(len(cameras))])
        kinds = ("rgb", "normal", "depth", "opacity")
        mesh = self._mesh_panels(Cameras.cat([c.with_size(*size).to("cpu") for c in [p.camera for p in photos] + [cameras]]))
        names = {"rgb": "field RGB", "normal": "field normals", "depth": "field depth", "opacity": "field opacity"}
        rows = []
        for kind in kinds:
            images = [*ref[kind]] + ([*views[kind]] if views is not None else [])
            rows.append([(names[kind], None)] + [(f"{label}" if kind == "rgb" else "", _fit(im, size))
                                                 for label, im in zip(labels, images)])
        rows[0][0] = ("input", _fit(self.reference.rgb, size))
        for name, images in zip(("mesh textured", "mesh shaded"), mesh):
            rows.append([(name, None)] + [("", _fit(im, size)) for im in images])
        if len(photos) > 1:
            rows.append([("other photos", None), ("", None)] + [(f"photo {i}", _fit(p.rgb, size))
                                                                for i, p in enumerate(photos[1:], start=2)])
        extra = self.guidance.summary_rows() if self.guidance is not None else []
        return rows + [[(label, None if im is None else _fit(im, size)) for label, im in row] for row in extra]

    def export(self, out_dir: str) -> dict:
        from lift3d.export.mesh import export_mesh

        render = None
        if not self.latent_field or self.guidance is not None:
            render = self._bake_render
        photos = self.references    # several: the level, the mask fit and the texture use every photo
        self.exported = export_mesh(self.geometry, out_dir, self.cfg.export, reference=photos if len(photos) > 1
                                    else self.reference, render=render,
                                    eval_size=self.data.cfg.eval_height)
        return self.exported

    def _bake_render(self, cameras: Cameras):
        """(rgb on white, opacity) of ``cameras`` for the texture; a latent field renders latents at 1/f
        of the size and decodes them to the full size."""
        if self.latent_field:
            f = self.guidance.latent_factor
            cameras = cameras.with_size(max(cameras.height // f, 1), max(cameras.width // f, 1))
        out = self.render_views(cameras.to(self.device), opacity=True)
        return out["rgb"], out["alpha"]

    def metrics(self, exported: dict, protocol: str) -> Optional[dict]:
        """The exported mesh's scores: ``reference_view`` (rendered from the input camera against the
        input) and ``field_views`` (against the field's own renders at the validation views) always;
        with a ground-truth mesh, the geometry metrics of ``protocol`` and ``gt_views`` (texture against
        the ground truth's at the evaluation views, when it has one)."""
        from lift3d.evaluation.appearance import compare_views, reference_view_scores, render_albedo
        from lift3d.mesh.io import load_mesh

        mesh = load_mesh(exported.get("glb") or exported["obj"])      # as a viewer opens it, in the world frame
        result: dict = {}
        if self.data.gt_mesh:
            from lift3d.evaluation.metrics import evaluate

            result = evaluate(exported["obj"], self.data.gt_mesh, protocol=protocol)
        result["reference_view"] = reference_view_scores(mesh, self.reference.camera, self.reference.rgba)
        if len(self.references) > 1:      # every photo from its own camera (the first is reference_view again)
            result["reference_views"] = [{"image": r.path, **reference_view_scores(mesh, r.camera, r.rgba)}
                                         for r in self.references]
        cameras = self.data.val_views()
        field = self.render_views(cameras.to(self.device), opacity=True)
        cameras = cameras.with_size(*field["rgb"].shape[1:3])
        ours = render_albedo(mesh, cameras)
        rows = [compare_views(ours[i], torch.cat([field["rgb"][i], field["alpha"][i]], -1)) for i in range(len(cameras))]
        result["field_views"] = {"psnr": sum(r["psnr_image"] for r in rows) / len(rows),
                                 "silhouette_iou": sum(r["silhouette_iou"] for r in rows) / len(rows),
                                 "note": f"the textured mesh against the field's renders at the {len(rows)} validation "
                                         "views (whole images on white)"}
        from lift3d.evaluation.metrics import check_finite

        return check_finite(result, "the export's scores")      # metrics.json holds numbers, or the run says why

    @property
    def device(self) -> torch.device:
        return next(self.geometry.parameters()).device

    @property
    def _background_depth(self) -> float:
        return float(getattr(getattr(self.renderer, "cfg", None), "background_depth", 0.0))

    def _reference_background(self) -> Optional[torch.Tensor]:
        """This step's background colour for the reference view (None: a latent field's own)."""
        if self.latent_field:
            return None
        if self.cfg.reference_background == "random":
            return torch.rand(self.geometry.n_feature_dims, device=self.device)
        return torch.ones(self.geometry.n_feature_dims, device=self.device)


def _fit(image: torch.Tensor, size) -> torch.Tensor:
    """An (H, W, C) image resized to ``size`` for the validation strip."""
    return resize(image[None], size, channels_last=True)[0]


def _same_view(a: Cameras, b: Cameras, tolerance_deg: float = 0.5) -> bool:
    """Whether two single cameras look from the same direction (elevation and azimuth within the tolerance)."""
    d = (a.spherical[0, :2].cpu() - b.spherical[0, :2].cpu()).abs()
    return bool(d[0] <= tolerance_deg and min(float(d[1]) % 360, 360 - float(d[1]) % 360) <= tolerance_deg)


def _azimuth(cameras: Cameras, i: int) -> str:
    return f"az {float(cameras.azimuth_deg[i]) % 360:.0f}"


def _nudged(cameras: Cameras, offset: float) -> Cameras:
    """The same views seen from eyes moved by ``offset`` in a random direction, still looking at the origin."""
    eye = cameras.position + offset * F.normalize(torch.randn_like(cameras.position), dim=-1)
    return Cameras(look_at(eye.cpu()).to(cameras.device), cameras.fovy_deg, cameras.height, cameras.width)
