"""python -m steel_ray.blend: the blend CLI (:mod:`.cli`)."""
import sys

from .cli import main

sys.exit(main())
