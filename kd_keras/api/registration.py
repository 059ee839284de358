"""Makes every kd_keras custom Keras object loadable after a plain `import kd_keras`.

The classes register themselves with `keras.saving.register_keras_serializable` when their
modules are imported, but those modules import TensorFlow (seconds), which `import kd_keras`
must not pay: the command lines read their flags before TensorFlow loads. So the package
installs a hook instead: Keras' registry lookup (`get_registered_object`, which
`keras.models.load_model` calls for every class named in a file) is wrapped so that the
first miss of a "kd_keras>..." name imports the registering modules and looks again. When
Keras is not imported yet, the wrapping waits for its registry module to be imported.
"""

import importlib
import importlib.abc
import importlib.util
import os
import sys

MARKER = "register_keras_serializable"
PREFIX = "kd_keras>"
_KERAS_REGISTRY = "keras.src.saving.object_registration"


def registering_modules():
    """Dotted names of the kd_keras modules whose source registers a Keras class (found by
    reading the files, so a new module with a custom layer needs no entry anywhere)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parent = os.path.dirname(root)
    found = []
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            if not name.endswith(".py") or name == "registration.py":
                continue
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8") as f:
                if MARKER not in f.read():
                    continue
            dotted = os.path.relpath(path, parent)[:-3].replace(os.sep, ".")
            found.append(dotted.removesuffix(".__init__"))
    return sorted(found)


def register_all():
    """Imports every registering module (each class registers itself on import)."""
    for name in registering_modules():
        importlib.import_module(name)


def _wrap(registry_module):
    lookup = registry_module.get_registered_object
    if getattr(lookup, "_kd_keras_hook", False):
        return

    def get_registered_object(name, custom_objects=None, module_objects=None):
        found = lookup(name, custom_objects, module_objects)
        if found is None and isinstance(name, str) and name.startswith(PREFIX):
            register_all()
            found = lookup(name, custom_objects, module_objects)
        return found

    get_registered_object._kd_keras_hook = True
    registry_module.get_registered_object = get_registered_object


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds Keras' registry module through the other finders and wraps it once loaded."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _KERAS_REGISTRY:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _wrap(module)
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install():
    """Wraps Keras' lookup now (Keras imported) or when Keras imports its registry."""
    module = sys.modules.get(_KERAS_REGISTRY)
    if module is not None:
        _wrap(module)
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
