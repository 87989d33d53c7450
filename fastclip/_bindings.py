"""The machinery of fastclip/patch.py: module-level names found by identity, and a
hook that runs a function right after a named module is first imported.

A binding is one module-level name: (module name, the module's namespace, attr).
"""

import importlib.abc
import sys


def _namespaces():
    """(name, namespace dict) of every loaded module. Read with object.__getattribute__:
    a lazy module (importlib.util.LazyLoader) would otherwise load itself, and a
    module's own __getattr__ could run."""
    for name, module in list(sys.modules.items()):
        try:
            namespace = object.__getattribute__(module, "__dict__")
        except (AttributeError, TypeError):
            continue
        if isinstance(namespace, dict):
            yield name, namespace


def find(objects, skip=lambda name: False):
    """[(binding, object)] for every module-level name bound to one of `objects`
    (identity, never the name) in the loaded modules but those for which
    skip(module name) is true."""
    by_id = {id(o): o for o in objects}
    found = []
    for name, namespace in _namespaces():
        if skip(name):
            continue
        items = list(namespace.items())  # a copy: another thread may be adding names to it
        if by_id.keys().isdisjoint([id(v) for _, v in items]):
            continue
        found += [((name, namespace, attr), by_id[id(v)]) for attr, v in items if id(v) in by_id]
    return found


def replace(binding, old, new):
    """Bind `new` where `binding` still holds `old`; whether it did."""
    _, namespace, attr = binding
    if namespace.get(attr) is old:
        namespace[attr] = new
        return True
    return False


def key(binding):
    """What identifies a binding in a set: its namespace and name."""
    return id(binding[1]), binding[2]


class _RunAfter(importlib.abc.Loader):
    """Runs the module's own loader, then callback(module); leaves no trace on the module."""

    def __init__(self, loader, callback):
        self.loader, self.callback = loader, callback

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.callback(module)

    def __getattr__(self, name):  # get_source, get_resource_reader, ... for whoever holds the spec
        return getattr(self.loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """On sys.meta_path while it has callbacks: finds a watched module with the finders
    after it and wraps its loader in _RunAfter."""

    def __init__(self):
        self.callbacks = {}  # module name -> callback(module)

    def find_spec(self, name, path, target=None):
        callback = self.callbacks.get(name)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RunAfter(spec.loader, callback)
        return spec


_after_import = _AfterImport()


def after_import(module_name, callback):
    """callback(module) right after `module_name` is next executed by an import (None: stop)."""
    if callback is None:
        _after_import.callbacks.pop(module_name, None)
        if not _after_import.callbacks and _after_import in sys.meta_path:
            sys.meta_path.remove(_after_import)
        return
    _after_import.callbacks[module_name] = callback
    if _after_import not in sys.meta_path:
        sys.meta_path.insert(0, _after_import)
