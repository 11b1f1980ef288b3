"""Registries: where the mesh's resources come from (a file or folder, memory, etcd).

``open_registry`` turns what a user passes to ``Mesh(...)`` into a ``Registry``.
"""

from __future__ import annotations

import os

from inmesh.exceptions import RegistryError
from inmesh.registry.base import Registry
from inmesh.registry.file import FileRegistry
from inmesh.registry.memory import MemoryRegistry

__all__ = ["FileRegistry", "MemoryRegistry", "Registry", "open_registry"]


def open_registry(source: str | os.PathLike[str] | Registry) -> Registry:
    """The registry that ``source`` names.

    A ``Registry`` is returned as it is; ``etcd://host:port/prefix`` names an etcd
    registry; anything else is the path of a YAML/JSON file or of a folder of them.
    Raises ``RegistryError`` for a path that does not exist.
    """
    if isinstance(source, Registry):
        return source
    location = os.fspath(source)
    scheme, separator, _ = location.partition("://")
    if separator and scheme.lower().startswith("etcd"):
        raise RegistryError(
            f"the etcd registry is not available yet ({location!r}); "
            "use a YAML file or a folder of them"
        )
    return FileRegistry(location)
