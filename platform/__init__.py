"""``platform``: the command namespace of kd-platform, which must also *be* the standard library.

Users type ``python -m platform.sweep``, and from the repository root this package then
shadows Python's standard ``platform`` module, which torch, ray, mlflow, pandas and
``uuid`` call (``platform.system()``, ``platform.python_version()`` ...). So this file
first executes the standard library's ``platform.py`` into this module's namespace:
every standard function and constant exists here, and objects pickled from the standard
module still resolve. Nothing of kd-platform lives here; the library is ``kd_platform``
(Ray's worker processes import the real standard module first, so nothing they unpickle
may come from this package). ``sweep`` and ``train`` only call the library.
"""
import os as _os
import sysconfig as _sysconfig

_STDLIB_PLATFORM = _os.path.join(_sysconfig.get_paths()["stdlib"], "platform.py")
with open(_STDLIB_PLATFORM, encoding="utf-8") as _fh:
    exec(compile(_fh.read(), _STDLIB_PLATFORM, "exec"), globals())
