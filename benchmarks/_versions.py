"""Installed versions recorded with each benchmark's results (shared by the benchmark scripts)."""

from __future__ import annotations

import importlib.metadata
import platform


def installed_versions(packages) -> dict:
    """``{package: version or None}`` for ``packages``, plus ssmjax's and Python's versions."""
    import ssmjax

    versions = {}
    for pkg in packages:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    versions["ssmjax"] = ssmjax.__version__
    versions["python"] = platform.python_version()
    return versions
