"""Paths in configs: `ddjax:REL` names a file inside the installed package (the shipped digits
teachers), so that configs stay plain data and work from any checkout or install."""

from __future__ import annotations

import os

PACKAGE_PREFIX = "ddjax:"
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_path(path: str) -> str:
    """`ddjax:REL` -> the installed package's REL; other paths unchanged ("" stays "")."""
    if path and path.startswith(PACKAGE_PREFIX):
        return os.path.join(PACKAGE_DIR, path[len(PACKAGE_PREFIX):])
    return path
