"""The one rule for a default identity derived from where code is defined.

A default key space (``@idempotent``'s and ``@idempotent_transaction``'s ``name=``, a Celery
task's consumer name) and the type names inside keys and stored errors come from
``module.qualname``. For code in the module Python runs as ``__main__`` (or ``__mp_main__`` in a
``multiprocessing`` child) that module name says nothing: ``python -m billing`` and ``import
billing`` would give ``billing.charge`` two names (so one charge runs twice), and two scripts
that each define ``process`` would share one (so one replays the other's result).
:func:`module_name` gives the module's real name instead:

1. the name the interpreter imported it by (``sys.modules['__main__'].__spec__.name``:
   ``python -m billing`` gives ``billing``, ``python -m pkg`` running ``pkg/__main__.py`` gives
   ``pkg.__main__``, the name ``import pkg.__main__`` gives, never ``pkg``, which
   ``pkg/__init__.py``'s own functions use);
2. else, for ``python path/billing.py``, the file's stem, but only when ``import billing``
   would load that very file (its directory is first on ``sys.path`` and is not a package
   directory): ``python pkg/billing.py`` is refused, since an import says ``pkg.billing``;
3. else (an interactive session, ``python -c``, a script read from stdin, a zip app) nothing
   identifies the code: :class:`~oncely.errors.ConfigurationError`, asking for ``name=``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from functools import lru_cache
from types import ModuleType

from oncely.errors import ConfigurationError

__all__ = ["MAIN_MODULES", "module_name", "qualified_name", "type_name"]

#: The names a script run by the interpreter gets (``__mp_main__``: in a ``multiprocessing``
#: spawn or forkserver child).
MAIN_MODULES = frozenset({"__main__", "__mp_main__"})


def _spec_name(module: ModuleType) -> str | None:
    spec = getattr(module, "__spec__", None)
    name = getattr(spec, "name", None)
    if isinstance(name, str) and name and name not in MAIN_MODULES:
        return name
    return None


@lru_cache(maxsize=64)
def _script_name(path: str, search: tuple[str, ...]) -> str | None:
    """The module name ``path`` is imported by, if importing its stem loads that very file."""
    directory, file = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(file)
    if ext != ".py" or not stem.isidentifier() or stem in MAIN_MODULES:
        return None
    if os.path.exists(os.path.join(directory, "__init__.py")):
        return None  # inside a package: an import names it pkg.stem, not stem
    try:
        spec = importlib.util.find_spec(stem)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    if not origin or not os.path.exists(origin):
        return None
    try:
        return stem if os.path.samefile(origin, path) else None
    except OSError:
        return None


def module_name(module: str, *, strict: bool = True, what: str = "") -> str:
    """``module``'s importable name: itself, unless it is ``__main__``/``__mp_main__`` (see the
    module docstring for how that one is named).

    :param strict: True: raise when the name cannot be found; False: give ``module`` back
        unchanged (for type names inside keys: consistent within the one process).
    :param what: what needs the name, for the message (``"@idempotent charge"``).
    :raises ConfigurationError: ``strict`` and nothing identifies the running script.
    """
    if module not in MAIN_MODULES:
        return module
    loaded = sys.modules.get(module)
    found = None if loaded is None else _spec_name(loaded)
    if found is None and loaded is not None:
        path = getattr(loaded, "__file__", None)
        if isinstance(path, str) and path:
            found = _script_name(path, tuple(p for p in sys.path if isinstance(p, str)))
    if found is not None:
        return found
    if not strict:
        return module
    raise ConfigurationError(
        f"{what or 'this code'} is defined in the {module} module of an interactive session, "
        "python -c, a script read from stdin or a script whose import name cannot be told "
        "(in a package directory: run it with python -m pkg.module): its default name would "
        "not tell it apart from other such code. Pass name='billing.charge' or the like (a "
        "stable name, kept when you move or rename the code)"
    )


def qualified_name(obj: object, what: str = "") -> str:
    """``module.qualname`` of a function or class, with the module named by
    :func:`module_name`.

    :raises ConfigurationError: no ``__qualname__``, a lambda (every lambda is ``<lambda>``), no
        ``__module__``, or a ``__main__`` that nothing identifies.
    """
    qualname = getattr(obj, "__qualname__", None)
    module = getattr(obj, "__module__", None)
    if not isinstance(qualname, str) or not qualname or "<lambda>" in qualname:
        raise ConfigurationError(
            f"{what or repr(obj)} has no name that tells it apart from other functions "
            "(lambdas share '<lambda>'); pass name='billing.charge' or the like"
        )
    if not isinstance(module, str) or not module:
        raise ConfigurationError(
            f"{what or repr(obj)} has no __module__, so its default name would not tell it "
            "apart from others; pass name='billing.charge' or the like"
        )
    return f"{module_name(module, what=what or qualname)}.{qualname}"


def type_name(cls: type) -> str:
    """``module.qualname`` of a class inside a key or a stored error: ``__main__`` named as
    :func:`module_name` does when it can, else left as it is (never raises)."""
    return f"{module_name(cls.__module__, strict=False)}.{cls.__qualname__}"
