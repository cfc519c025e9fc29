"""One exception family for everything winq refuses to do.

Library code raises these; the CLI turns them into one red line and exit code 1.
Messages name the bad value and the valid choices.
"""


class WinqError(Exception):
    """Base class: a problem the user can fix (bad input, missing file, unsupported combination)."""


class ConfigError(WinqError, ValueError):
    """An invalid setting: bits, grid, group size, method, hyperparameter."""


class CheckpointError(WinqError):
    """A checkpoint folder that is missing, incomplete or corrupt."""


class DataError(WinqError):
    """A data set that is missing, empty or unreadable."""


class ModelError(WinqError):
    """A model that cannot be loaded or prepared (unknown folder, NaN weights, no Linear layers)."""


class FormatError(WinqError):
    """Bytes that do not hold what they should: a weight with no exact form in a file format, or a
    file that does not read back as it was written (winq.formats)."""


class MissingDependencyError(WinqError, ImportError):
    """An optional dependency is absent; the message carries the pip command."""


# the extra that provides each optional module, and what its installation involves
EXTRAS = {"gptq": ("optimum", "gptqmodel"), "onnx": ("onnx", "onnxruntime"), "llamacpp": ("llama_cpp",),
          "kernels": ("triton",)}
EXTRA_NOTES = {
    "gptq": "(optimum==2.3.0 gptqmodel==7.6.0)",
    "llamacpp": '(builds llama.cpp from the llama-cpp-python sdist, about 9 minutes; set '
                'CMAKE_ARGS="-DLLAVA_BUILD=OFF")',
}
PACKAGE_NAMES = {"llama_cpp": "llama-cpp-python"}  # pip names where they differ from the module's


def pip_command(extra: str) -> str:
    """The command that installs a winq extra, e.g. `pip install "winq[onnx]"` (quoted for every shell)."""
    return f'pip install "winq[{extra}]"'


def _missing(names: list[str], extra: str, purpose: str) -> MissingDependencyError:
    note = EXTRA_NOTES.get(extra)
    pkgs = " and ".join(PACKAGE_NAMES.get(n, n) for n in names)
    return MissingDependencyError(f"{purpose} needs {pkgs}: run `{pip_command(extra)}`" + (f" {note}" if note else ""))


def require(*modules: str, extra: str, purpose: str):
    """Import optional modules (all of them, in order) or raise MissingDependencyError:
    '{purpose} needs a and b: run `pip install "winq[extra]"`'. Returns the modules (one module alone)."""
    import importlib

    found, missing = [], []
    for name in modules:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        raise _missing(missing, extra, purpose)
    return found[0] if len(found) == 1 else tuple(found)


def check_installed(*modules: str, extra: str, purpose: str) -> None:
    """Like require, without importing anything (for a parent process that only plans the work)."""
    import importlib.util
    import sys

    def absent(name: str) -> bool:
        if name in sys.modules:
            return sys.modules[name] is None  # None: imports of it are blocked
        return importlib.util.find_spec(name) is None

    missing = [m for m in modules if absent(m)]
    if missing:
        raise _missing(missing, extra, purpose)
