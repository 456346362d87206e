"""EscherNet (kxhit/EscherNet): multi-view diffusion with CaPE camera encodings, in layers:

- :mod:`.cape`: the camera encodings (4-DoF, 6-DoF) and the multi-view attention processor;
- :mod:`.model`: :class:`EscherNetModel` (UNet, VAE, ConvNeXt-V2 image encoder, schedule);
- :mod:`.folder`: the published folder layout (reading, assembling, writing);
- :mod:`.random_model`: random weights in that layout for tests and benchmarks.
The prior that lift3d's guidance uses is :mod:`lift3d.priors.eschernet`. Heavy libraries (diffusers,
transformers) are imported only when a model is built or loaded.
"""
