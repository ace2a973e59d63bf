"""Serve the book's JavaScript libraries from the book itself, so that it works offline.

MathJax (math) and the ipywidgets HTML manager (the notebooks' widgets, drawn from their
saved state) come from the npm registry when the book is built, never from the
repository: the first build runs ``npm pack`` for each pinned package and unpacks the
files the browser needs into the git-ignored ``_vendor/`` folder; every build (``make
book``, the tests, CI) then copies them into ``_build/html/_static/``. Where npm or the
registry is not available, the book loads them from a CDN instead and the build says so
on stderr (a printed notice, not a Sphinx warning: the book builds with ``-W``).

It also keeps each page's scripts free of console errors: every inline script appears once.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config

VENDOR = "_vendor"


@dataclass(frozen=True)
class Package:
    spec: str  # pinned npm package
    folder: str  # the folder of the package that the browser needs
    served_as: str  # its name under _static/
    skip: tuple[str, ...] = ()  # glob patterns of files in it that no page loads

    @property
    def home(self) -> str:
        """The folder under _vendor/ whose contents Sphinx copies into _static/."""
        return self.spec.lstrip("@").replace("/", "-").replace("@", "-")


MATHJAX = Package("mathjax@3.2.2", "es5", "mathjax")
# The standalone embedder: every standard widget built in, no RequireJS, no CDN for them.
WIDGETS = Package("@jupyter-widgets/html-manager@1.0.15", "dist", "jupyter-widgets",
                  skip=("*.map", "*amd.js"))


def _fetch(package: Package, vendor: Path) -> Path:
    """Unpack ``package.folder`` of the npm tarball into ``vendor/home/served_as`` (once)."""
    home = vendor / package.home
    if (home / package.served_as).is_dir():
        return home
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed (install Node.js)")
    vendor.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=vendor) as tmp:
        proc = subprocess.run([npm, "pack", package.spec, "--silent", "--pack-destination", tmp],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"npm pack {package.spec} failed: {proc.stderr.strip()[-500:]}")
        tarball = Path(tmp) / proc.stdout.split()[-1]
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        served = Path(tmp) / "staged" / package.served_as
        shutil.copytree(Path(tmp) / "package" / package.folder, served,
                        ignore=shutil.ignore_patterns(*package.skip))
        try:  # a rename is atomic, so a build running at the same time sees all files or none
            (Path(tmp) / "staged").rename(home)
        except OSError:
            if not (home / package.served_as).is_dir():
                raise
    return home


def _serve_locally(app: Sphinx, config: Config) -> None:
    vendor = Path(app.srcdir) / VENDOR
    try:
        homes = [_fetch(package, vendor) for package in (MATHJAX, WIDGETS)]
    except (RuntimeError, OSError, subprocess.TimeoutExpired, tarfile.TarError) as error:
        print(f"offline_assets: {error}. The book loads MathJax and the widget library from a CDN "
              "instead, so its math and widgets need an internet connection.", file=sys.stderr)
        return
    config.html_static_path = [*config.html_static_path, *map(str, homes)]
    config.mathjax_path = f"{MATHJAX.served_as}/tex-mml-chtml.js"
    # The shim (book/_static) lets the widget library typeset with MathJax 3.
    config.nb_ipywidgets_js = {"widgets-mathjax.js": {}, f"{WIDGETS.served_as}/embed.js": {}}


def _load_each_script_once(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Drop repeated inline scripts from the page.

    Sphinx 7 adds an inline script registered while reading (sphinx-thebe's configuration)
    to the page twice, and the second copy fails in every page's console with "Identifier
    'THEBE_JS_URL' has already been declared".
    """
    seen = set()
    unique = []
    for script in context.get("script_files", []):
        # An inline script's filename is None in one copy and "" in the other.
        filename = getattr(script, "filename", script) or ""
        key = (str(filename), repr(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app: Sphinx) -> dict:
    # Before myst-nb reads nb_ipywidgets_js (builder-inited) and the builder copies _static.
    app.connect("config-inited", _serve_locally)
    app.connect("html-page-context", _load_each_script_once)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
