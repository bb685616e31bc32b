"""Shared fixtures. Keep this small and generic; media helpers live in tests/media.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import media
import pytest


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the generated clips of the whole session."""
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def make_clip(media_dir: Path) -> Callable[..., Path]:
    """make_clip(name, **write_clip_kwargs) -> path: writes tests.media.write_clip once per session and name
    (the same name must always come with the same arguments)."""
    made: dict[str, tuple] = {}

    def make(name: str, **kwargs) -> Path:
        path = media_dir / name
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items() if not callable(v)))
        if name in made:
            assert made[name] == key, f"clip {name} requested with different arguments"
            return path
        media.write_clip(path, **kwargs)
        made[name] = key
        return path

    return make

