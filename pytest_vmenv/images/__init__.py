"""Images built from a distribution's archive: recipes, their keys, the builder, the cache.

A recipe (:class:`Recipe`: a Debian base such as ``debian-12``, packages, an init) is built
with ``mmdebstrap`` from the archive as the host's apt is configured (:mod:`.sources`), once,
into ``<state>/images/<key>/rootfs`` (:class:`ImageCache`), and shared by every backend,
session and xdist worker on this host. Builds publish their progress (:mod:`.progress`).
"""

from __future__ import annotations

from .build import builder_problem
from .cache import BuiltImage, ImageCache, read_json, remove_tree
from .progress import BuildEvent, LinePrinter, publish, subscribe
from .recipe import BASES, INITS, PACKAGE_RULE, RECIPE_VERSION, Recipe, check_packages, recipe_of

__all__ = [
    "BASES",
    "INITS",
    "PACKAGE_RULE",
    "RECIPE_VERSION",
    "BuildEvent",
    "BuiltImage",
    "ImageCache",
    "LinePrinter",
    "Recipe",
    "builder_problem",
    "check_packages",
    "publish",
    "recipe_of",
    "read_json",
    "remove_tree",
    "subscribe",
]
