"""Tribune, one import package: ``tribune.v1`` (the wire contract generated from protos/),
``tribune.trainer`` and ``tribune.services`` (the repository's trainer/ and services/ folders,
mapped by pyproject's package-dir, so an install never collides with the published ``trainer``
or ``services`` packages).

In a source checkout used without an install (``PYTHONPATH=protos``), the two folders sit beside
protos/, one level above this package: they are added to its search path. An installed copy
(wheel or editable) does not sit in a protos/ folder and is left as it is.
"""
import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_os.path.dirname(_here))
if (_os.path.basename(_os.path.dirname(_here)) == "protos"
        and _os.path.isfile(_os.path.join(_root, "trainer", "__init__.py"))):
    __path__.append(_root)  # noqa: F821 (a package's __path__)
del _os, _here, _root
