"""Find plugins: built-in packages, the ``lowbit_studio.plugins`` entry-point group, a user folder.

Each source provides a module-level ``plugin`` (a ``Plugin`` instance). A plugin that fails to import
or to register is recorded in ``Registry.errors`` with its reason, and the rest still load.
"""

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
import traceback
from pathlib import Path

from plugins.base import Plugin

logger = logging.getLogger(__name__)

BUILTIN = ("plugins.full", "plugins.gguf", "plugins.qdiffusion")
ENTRY_POINT_GROUP = "lowbit_studio.plugins"
USER_DIR_VARIABLE = "LOWBIT_PLUGINS_DIR"
DEFAULT_USER_DIR = Path.home() / ".lowbit-studio" / "plugins"


class Registry:
    """The plugins found, keyed by id, and the sources that failed with their reasons."""

    def __init__(self):
        self.plugins: dict[str, Plugin] = {}
        self.errors: dict[str, str] = {}

    def register(self, plugin: Plugin, source: str) -> None:
        if not isinstance(plugin, Plugin):
            raise TypeError(f"{source} provides {type(plugin).__name__}, not a Plugin instance")
        if plugin.id in self.plugins:
            raise ValueError(f"plugin id {plugin.id!r} from {source} is already registered")
        self.plugins[plugin.id] = plugin

    def get(self, plugin_id: str) -> Plugin:
        if plugin_id not in self.plugins:
            known = ", ".join(self.plugins) or "none"
            broken = f"; failed to load: {', '.join(self.errors)}" if self.errors else ""
            raise KeyError(f"unknown plugin {plugin_id!r}; available: {known}{broken}")
        return self.plugins[plugin_id]

    def _load(self, source: str, load_module) -> None:
        try:
            module = load_module()
            plugin = getattr(module, "plugin", module)
            self.register(plugin, source)
        except Exception as error:  # a broken plugin must not stop the app
            self.errors[source] = f"{type(error).__name__}: {error}"
            logger.warning("plugin %s failed to load: %s", source, self.errors[source])
            logger.debug("%s", traceback.format_exc())

    def discover(self, user_dir: Path | None = None) -> "Registry":
        for name in BUILTIN:
            self._load(name, lambda name=name: importlib.import_module(name))
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if entry_point.module in BUILTIN:
                continue  # an installed copy of this project lists its built-ins too
            self._load(f"entry point {entry_point.name}", entry_point.load)
        user_dir = user_dir or Path(os.environ.get(USER_DIR_VARIABLE, DEFAULT_USER_DIR))
        if user_dir.is_dir():
            for path in sorted(user_dir.iterdir()):
                if path.suffix == ".py" or (path / "__init__.py").is_file():
                    self._load(str(path), lambda path=path: _import_file(path))
        return self


def _import_file(path: Path):
    """Import a plugin module or package from a file path under a private module name."""
    location = path / "__init__.py" if path.is_dir() else path
    module_name = f"lowbit_user_plugins.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, location)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def discover(user_dir: Path | None = None) -> Registry:
    """Build a registry from every plugin source."""
    return Registry().discover(user_dir)
