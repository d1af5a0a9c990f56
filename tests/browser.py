"""Chromium for the browser tests: the Debian package, driven by Playwright (whose own
browser download cannot run on these machines); `scripts/bootstrap.sh --system` installs it."""

from __future__ import annotations

import os
import shutil

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    candidates = [os.environ.get("RAGLINE_TEST_CHROMIUM"), shutil.which("chromium")]
    candidates.append("/usr/bin/chromium")
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)
