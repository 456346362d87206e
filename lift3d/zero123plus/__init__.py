"""Zero123++ (SUDO-AI-3D, v1.1 and v1.2): six fixed views of an object in one 3x2 tile, from its published
diffusers folders (:mod:`lift3d.zero123plus.model`), and tiny random folders in that layout for tests
(:mod:`lift3d.zero123plus.random_model`)."""
