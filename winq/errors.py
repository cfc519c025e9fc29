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


class MissingDependencyError(WinqError, ImportError):
    """An optional dependency is absent; the message carries the pip command."""


def require(module: str, pip: str):
    """Import an optional module or raise MissingDependencyError naming the pip command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - exercised when extras are absent
        raise MissingDependencyError(f"{module} is not installed: run `pip install {pip}`") from e
