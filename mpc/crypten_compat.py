"""Make `import crypten` work on torch 2.13.

crypten 0.4.1 imports `torch.onnx._internal.registration`, which torch moved to
`torch.onnx._internal.torchscript_exporter.registration`. Importing this module
first aliases the old name to the new one; nothing else in crypten needs it.
Always import crypten through `load_crypten()`.
"""

import importlib
import sys
from types import ModuleType

_OLD = "torch.onnx._internal.registration"
_NEW = "torch.onnx._internal.torchscript_exporter.registration"


def _alias_onnx_registration() -> None:
    if _OLD in sys.modules:
        return
    try:
        importlib.import_module(_OLD)
    except ModuleNotFoundError:
        sys.modules[_OLD] = importlib.import_module(_NEW)


def load_crypten() -> ModuleType:
    """Return the `crypten` module, imported with the torch 2.13 alias in place."""
    _alias_onnx_registration()
    import crypten

    return crypten
