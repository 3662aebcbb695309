"""Headless Chromium (Debian's /usr/bin/chromium): a dashboard page as DOM text and PNG.

    html = dump_dom("http://127.0.0.1:8700/", profile=tmp / "p1")
    screenshot("http://127.0.0.1:8700/", tmp / "dash.png", profile=tmp / "p2")

The flags keep Chromium off the network except for the page (this machine refuses outside
connections, and background services would retry them) and let it run as root without a
sandbox, as CI does. Each call gets a fresh profile directory.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from PIL import Image, ImageStat

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def chromium(profile: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run headless Chromium with `args`; FileNotFoundError names the fix if it is missing."""
    if not CHROMIUM.exists():
        raise FileNotFoundError(
            f"{CHROMIUM} missing: run scripts/env.sh as root (it installs Debian's chromium)"
        )
    cmd = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)


def dump_dom(url: str, profile: Path) -> str:
    """The page's DOM after load, serialised as HTML."""
    done = chromium(profile, "--dump-dom", url)
    if done.returncode != 0 or "</html>" not in done.stdout.decode():
        raise RuntimeError(f"chromium --dump-dom {url} failed: {done.stderr.decode()[-1500:]}")
    return done.stdout.decode()


def screenshot(url: str, out: Path, profile: Path, size: tuple[int, int] = (1280, 2000)) -> Path:
    """A PNG of the page at `size` (width, height)."""
    done = chromium(profile, f"--screenshot={out}", f"--window-size={size[0]},{size[1]}", url)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"chromium --screenshot {url} failed: {done.stderr.decode()[-1500:]}")
    return out


def blank_reason(path: Path) -> str | None:
    """Why the PNG at `path` looks blank (near-uniform, or a handful of colours), or None."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        stddev = ImageStat.Stat(rgb.convert("L")).stddev[0]
        colours = rgb.getcolors(maxcolors=1 << 20)
    if stddev <= 10:
        return f"near-uniform image (brightness stddev {stddev:.1f})"
    if colours is not None and len(colours) <= 30:
        return f"only {len(colours)} colours"
    return None
