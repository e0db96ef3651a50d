"""A screenshot of the run report as a person sees it: headless Chromium, no network access needed."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from balpoe.errors import BalpoeError
from balpoe.runtime.files import atomic_write, check_output_path

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")


def find_chromium() -> str | None:
    """The headless Chromium executable (Debian package ``chromium``), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def chromium(args: list[str], profile: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run headless Chromium with ``args`` and a fresh profile folder (no network access needed)."""
    exe = find_chromium()
    if exe is None:
        raise BalpoeError("a screenshot of the report needs headless Chromium: apt-get install -y chromium")
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=timeout)


def screenshot(html: str | Path, png: str | Path, width: int = 1200, height: int = 12000) -> Path:
    """A PNG of the page ``html`` as Chromium shows it ``width`` pixels wide; the empty page below the
    content is cut off (the window is ``height`` pixels tall)."""
    check_output_path(png, "screenshot", inputs=[html])
    html, png = Path(html).resolve(), Path(png)
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        r = chromium([f"--window-size={width},{height}", f"--screenshot={shot}", html.as_uri()], Path(tmp) / "profile")
        if not shot.is_file():
            raise BalpoeError(f"Chromium wrote no screenshot of '{html}' ({r.stderr.strip().splitlines()[-1:]})")
        with Image.open(shot) as img:
            rgb = np.asarray(img.convert("RGB"))
    background = rgb[-1, rgb.shape[1] // 2].astype(int)  # the page colour below the content
    rows = np.where((np.abs(rgb.astype(int) - background) > 8).any(axis=(1, 2)))[0]
    bottom = int(rows[-1]) + 24 if len(rows) else rgb.shape[0]
    atomic_write(png, lambda f: Image.fromarray(rgb[:min(bottom, rgb.shape[0])]).save(f, format="PNG", optimize=True))
    return png

