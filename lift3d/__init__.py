"""lift3d: single-image-to-3D reconstruction.

Importing this package is cheap: it pulls in neither torch nor any plugin.
Plugins are imported on first use of :func:`find`.
"""

from lift3d.registry import find, register, registered_names

__version__ = "0.1.0"
__all__ = ["find", "register", "registered_names", "__version__"]
