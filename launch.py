#!/usr/bin/env python
"""python launch.py --config configs/zero123-sjc.yaml image=photo.png [--train|--test|--export] [key=value ...]"""

from lift3d.cli import launch_main

if __name__ == "__main__":
    launch_main()
