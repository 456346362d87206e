"""View-conditioned diffusion priors: models that score a view of an object given a reference image
and the relative camera (Zero123, Stable-Zero123, the Cascade-Zero123 refiner). A distillation
method (``lift3d.guidance``) turns their noise predictions into gradients; see ``base.py``."""
