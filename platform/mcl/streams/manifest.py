"""Data manifests: what a stream's data root held when it was checked, file by file.

A manifest is a JSON file listing every annotation file under the root (any file that is not an image: JSON,
JSONL, Parquet, ...) with its size and sha256, and every image with its size and sha256. Hidden files and
folders (names starting with ``.``) are left out, and so is the manifest itself when it lies in the root.
``jobs/prepare_data.py --manifest PATH`` writes one; a run with ``stream.manifest=PATH`` checks its data against
it before training (:func:`check_manifest`) and names every changed, missing or added file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mcl.errors import DataChangedError, DataError

MANIFEST_FORMAT = "mcl-data-manifest/1"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def data_files(root: Path, skip: Path | None = None) -> tuple[list[Path], list[Path]]:
    """``(annotation files, images)`` under ``root``, sorted, hidden names and ``skip`` left out."""
    annotations: list[Path] = []
    images: list[Path] = []
    skip_resolved = skip.resolve() if skip is not None else None
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if skip_resolved is not None and path.resolve() == skip_resolved:
            continue
        (images if path.suffix.lower() in IMAGE_SUFFIXES else annotations).append(path)
    return annotations, images


def _entries(root: Path, files: list[Path], workers: int) -> dict[str, dict[str, Any]]:
    def entry(path: Path) -> tuple[str, dict[str, Any]]:
        return path.relative_to(root).as_posix(), {"size": path.stat().st_size, "sha256": file_sha256(path)}

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # hashlib releases the GIL
        return dict(pool.map(entry, files))


def build_manifest(
    root: str | Path, stream: str = "", workers: int = 8, skip: Path | None = None
) -> dict[str, Any]:
    """The manifest of ``root``: ``{"format", "stream", "annotations": {rel: {size, sha256}}, "images": ...}``."""
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"stream.root: {base} is not a folder")
    annotations, images = data_files(base, skip)
    return {
        "format": MANIFEST_FORMAT,
        "stream": stream,
        "annotations": _entries(base, annotations, workers),
        "images": _entries(base, images, workers),
    }


def write_manifest(manifest: dict[str, Any], path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A manifest file; DataError naming ``stream.manifest`` when it is missing or not a manifest."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"stream.manifest: cannot read {p}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise DataError(f"stream.manifest: {p} is not an mcl data manifest (format {MANIFEST_FORMAT})")
    return data


def manifest_sha256(path: str | Path) -> str:
    """The manifest file's own hash: the run's data identity when it was checked against it."""
    return file_sha256(Path(path))


def compare_manifests(expected: dict[str, Any], found: dict[str, Any]) -> dict[str, list[str]]:
    """``{"changed", "missing", "added"}``: relative paths whose size or hash differ, that are gone, or new."""
    old = {**expected.get("annotations", {}), **expected.get("images", {})}
    new = {**found.get("annotations", {}), **found.get("images", {})}
    return {
        "changed": sorted(p for p in old.keys() & new.keys() if old[p] != new[p]),
        "missing": sorted(old.keys() - new.keys()),
        "added": sorted(new.keys() - old.keys()),
    }


def check_manifest(
    root: str | Path, manifest_path: str | Path, workers: int = 8, log: Callable[[str], None] = print
) -> str:
    """Check ``root`` against the manifest; return the manifest's sha256, or raise :class:`DataChangedError`
    naming every changed, missing and added file."""
    expected = read_manifest(manifest_path)
    found = build_manifest(root, expected.get("stream", ""), workers, skip=Path(manifest_path))
    diff = compare_manifests(expected, found)
    if any(diff.values()):
        raise DataChangedError(Path(root), Path(manifest_path), **diff)
    count = len(found["annotations"]) + len(found["images"])
    log(f"stream.manifest: {count} files under {root} match {manifest_path}")
    return manifest_sha256(manifest_path)


def annotations_sha256(root: str | Path) -> str:
    """One hash of every annotation file under ``root`` (relative path and content; images left out): the
    data identity of a run without a manifest."""
    base = Path(root)
    annotations, _ = data_files(base) if base.is_dir() else ([], [])
    digest = hashlib.sha256()
    for path in annotations:
        digest.update(f"{path.relative_to(base).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()
