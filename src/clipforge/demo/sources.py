"""Where the demo's real images come from, and how to get them onto this machine.

Every source installs from an ordinary package registry, so a fresh machine with no hub access can
build the demo dataset: Debian's apt for the Tux Paint stamps, the Open Clip Art Library and the SVG
renderer (librsvg's ``rsvg-convert``), npm for the emoji sets. Debian packages install system-wide (root needed); npm packages install into
``<cache_dir>/npm`` with pinned versions, so two machines build the same dataset.

When a package manager is missing, the user is not root, or an install fails, ``install_sources``
raises ``DemoSourceError`` whose message is the exact command to run by hand.

Typical use (``prepare_demo_data`` does this for you)::

    from clipforge.demo.sources import default_cache_dir, install_sources
    install_sources(default_cache_dir())
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..runtime import cache_root
from ..runtime import log_progress as _log


class DemoSourceError(RuntimeError):
    """A demo source is missing and could not be installed; the message says what to run."""


@dataclass(frozen=True)
class Package:
    manager: str  # "apt" or "npm"
    name: str  # the package name as the manager spells it
    version: str | None  # npm: the pinned version; apt: None (whatever the distribution ships)
    probe: str  # apt: an absolute path (folder or program) the package installs; npm: its folder under node_modules
    licence: str  # licence of the files we use from it
    url: str  # where the licence and the upstream project are described


@dataclass(frozen=True)
class Source:
    name: str  # key used for folders and in the manifest: "noto", "twemoji", ...
    role: str  # "train", "eval" (never in training) or "metadata" (names and keywords, no images)
    packages: tuple[str, ...]  # names of the Package entries it needs
    description: str


# Pinned npm versions: bumping one changes the dataset, so it changes the manifest too.
PACKAGES: dict[str, Package] = {p.name: p for p in [
    Package("apt", "tuxpaint-stamps-default", None, "/usr/share/tuxpaint/stamps",
            "GPL-2.0-or-later", "https://tuxpaint.org/ (see /usr/share/doc/tuxpaint-stamps-default/copyright)"),
    Package("apt", "openclipart-png", None, "/usr/share/openclipart/png",
            "public domain (files whose SVG metadata says otherwise are skipped)", "https://openclipart.org/"),
    Package("apt", "openclipart-svg", None, "/usr/share/openclipart/svg",
            "public domain (only the titles and keywords are read)", "https://openclipart.org/"),
    Package("apt", "librsvg2-bin", None, "/usr/bin/rsvg-convert",
            "LGPL-2.1-or-later (the SVG renderer; none of its files end up in the dataset)",
            "https://gitlab.gnome.org/GNOME/librsvg"),
    Package("npm", "emoji-datasource-google", "16.0.0", "emoji-datasource-google",
            "images: Apache-2.0 (Noto Emoji, Google); data: MIT",
            "https://github.com/iamcal/emoji-data"),
    Package("npm", "emoji-datasource-twitter", "16.0.0", "emoji-datasource-twitter",
            "images: CC-BY-4.0 (Twemoji, Copyright Twitter Inc. and other contributors); data: MIT",
            "https://github.com/jdecked/twemoji"),
    Package("npm", "emojibase-data", "17.0.0", "emojibase-data",
            "MIT (names and keywords from Unicode CLDR, Unicode License v3)", "https://emojibase.dev/"),
    Package("npm", "openmoji", "17.0.0", "openmoji",
            "CC-BY-SA-4.0 (OpenMoji, HfG Schwaebisch Gmuend and contributors)", "https://openmoji.org/"),
    Package("npm", "@lobehub/fluent-emoji-3d", "1.1.0", "@lobehub/fluent-emoji-3d",
            "MIT (Fluent Emoji, Microsoft)", "https://github.com/lobehub/fluent-emoji"),
]}

SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("tuxpaint", "train", ("tuxpaint-stamps-default", "librsvg2-bin"),
           "Tux Paint stamps (drawings and cut-out photos) with a caption written by a person"),
    Source("openclipart", "train", ("openclipart-png", "openclipart-svg"),
           "Open Clip Art Library drawings with their titles and keywords"),
    Source("noto", "train", ("emoji-datasource-google", "emojibase-data"),
           "Noto emoji (64 px) named by their Unicode CLDR names and keywords"),
    Source("twemoji", "train", ("emoji-datasource-twitter", "emojibase-data"),
           "Twemoji (64 px) named by their Unicode CLDR names and keywords"),
    Source("openmoji", "train", ("openmoji", "librsvg2-bin", "emojibase-data"),
           "OpenMoji (colour SVGs rendered with rsvg-convert) named by their Unicode CLDR names and keywords"),
    Source("fluent3d", "eval", ("@lobehub/fluent-emoji-3d", "emojibase-data"),
           "Fluent emoji 3D renders: a style never seen in training, for zero-shot evaluation"),
]}


def default_cache_dir() -> Path:
    """``demo/`` under the cache root (``$CLIPFORGE_CACHE``, default ``~/.cache/clipforge``)."""
    return cache_root() / "demo"


def npm_modules_dir(cache_dir: str | os.PathLike) -> Path:
    """The ``node_modules`` folder the demo's npm packages are installed into."""
    return Path(cache_dir) / "npm" / "node_modules"


def package_dir(package: str, cache_dir: str | os.PathLike) -> Path:
    """Where an installed package's files are: a system path for apt, under the cache for npm."""
    entry = PACKAGES[package]
    if entry.manager == "apt":
        return Path(entry.probe)
    return npm_modules_dir(cache_dir) / entry.probe


def is_installed(package: str, cache_dir: str | os.PathLike) -> bool:
    """True when the package's files are present (and, for npm, at the pinned version)."""
    entry = PACKAGES[package]
    folder = package_dir(package, cache_dir)
    if entry.manager == "apt":
        return folder.is_file() or (folder.is_dir() and any(folder.iterdir()))
    manifest = folder / "package.json"
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("version") == entry.version
    except (OSError, ValueError):
        return False


def packages_for(sources: list[str]) -> list[str]:
    """The package names the given sources need, without repeats, in a stable order."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown demo source(s) {unknown}; expected some of {sorted(SOURCES)}")
    names: list[str] = []
    for source in sources:
        names += [p for p in SOURCES[source].packages if p not in names]
    return names


def missing_packages(cache_dir: str | os.PathLike, sources: list[str] | None = None) -> list[str]:
    """The packages the given sources (default: all) need that are not installed yet."""
    return [p for p in packages_for(sources or list(SOURCES)) if not is_installed(p, cache_dir)]


def install_commands(packages: list[str], cache_dir: str | os.PathLike) -> list[str]:
    """The shell commands that install the given packages, as a user would type them."""
    apt = [p for p in packages if PACKAGES[p].manager == "apt"]
    npm = [f"{p}@{PACKAGES[p].version}" for p in packages if PACKAGES[p].manager == "npm"]
    commands = []
    if apt:
        sudo = "" if _is_root() else "sudo "
        commands.append(f"{sudo}apt-get install -y --no-install-recommends {' '.join(apt)}")
    if npm:
        prefix = shlex.quote(str(Path(cache_dir) / "npm"))
        commands.append(f"npm install --prefix {prefix} --no-audit --no-fund --ignore-scripts {' '.join(npm)}")
    return commands


def install_sources(cache_dir: str | os.PathLike, sources: list[str] | None = None,
                    progress: bool = True) -> None:
    """Install whatever the given sources (default: all) still lack; does nothing when all are there.

    Raises ``DemoSourceError`` naming the command to run when apt-get or npm is missing, when apt
    needs root and we are not root, or when an install fails.
    """
    missing = missing_packages(cache_dir, sources)
    apt = [p for p in missing if PACKAGES[p].manager == "apt"]
    npm = [p for p in missing if PACKAGES[p].manager == "npm"]
    if npm:  # first: it needs no root, so a failing apt step still leaves the npm part done
        _install_npm(npm, cache_dir, progress)
    if apt:
        _install_apt(apt, cache_dir, progress)
    still_missing = missing_packages(cache_dir, sources)
    if still_missing:
        raise DemoSourceError(f"demo packages {still_missing} are still missing after installing; "
                              f"run: {' && '.join(install_commands(still_missing, cache_dir))}")


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _install_apt(packages: list[str], cache_dir: str | os.PathLike, progress: bool) -> None:
    command = install_commands(packages, cache_dir)[0]
    if shutil.which("apt-get") is None:
        raise DemoSourceError(f"the demo needs the Debian packages {packages} but apt-get is not on PATH; "
                              f"on Debian or Ubuntu run: {command}")
    if not _is_root():
        raise DemoSourceError(f"the demo needs the Debian packages {packages}, which only root can "
                              f"install; run: {command}")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _log(progress, f"demo data: installing {' '.join(packages)} with apt-get (about 320 MB to download)")
    if _run(install, env, progress) != 0:
        # A fresh container often has empty package lists: refresh them once and retry.
        _log(progress, "demo data: apt-get install failed; running apt-get update and retrying")
        if _run(["apt-get", "update"], env, progress) != 0 or _run(install, env, progress) != 0:
            raise DemoSourceError(f"apt-get could not install {packages}; run: apt-get update && {command}")


def _install_npm(packages: list[str], cache_dir: str | os.PathLike, progress: bool) -> None:
    command = install_commands(packages, cache_dir)[-1]
    if shutil.which("npm") is None:
        raise DemoSourceError(f"the demo needs the npm packages {packages} but npm is not on PATH; install "
                              f"Node.js (Debian: apt-get install -y npm), then run: {command}")
    prefix = Path(cache_dir) / "npm"
    prefix.mkdir(parents=True, exist_ok=True)
    specs = [f"{p}@{PACKAGES[p].version}" for p in packages]
    _log(progress, f"demo data: installing {' '.join(specs)} with npm into {prefix}")
    install = ["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--ignore-scripts", *specs]
    if _run(install, dict(os.environ), progress) != 0:
        raise DemoSourceError(f"npm could not install {specs} (is the npm registry reachable?); run: {command}")


def _run(argv: list[str], env: dict[str, str], progress: bool) -> int:
    """Run a package manager; its output is shown when progress is on, else only on failure."""
    if progress:
        return subprocess.run(argv, env=env, stdout=sys.stderr, stderr=sys.stderr).returncode
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-2000:] + done.stderr[-2000:])
    return done.returncode

