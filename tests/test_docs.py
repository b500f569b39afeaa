"""The documentation site builds with ``mkdocs build --strict`` (skipped without the ``docs`` extra).

Strict mode fails on a broken link or anchor, a page missing from the nav, a snippet file
that does not exist, or a docstring that mkdocstrings cannot render. ``make docs`` installs
the extra and runs the same build into ``site/``; ``.ci/run`` calls it after ``make test``.
"""

import os
import subprocess
import sys

import pytest

from helpers import ROOT

pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]', or make docs)")
pytest.importorskip("mkdocstrings", reason="the docs extra is not installed (pip install -e '.[docs]', or make docs)")
pytest.importorskip("material", reason="the docs extra is not installed (pip install -e '.[docs]', or make docs)")


def test_docs_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    # every page of the nav was written, the API reference was generated and the README's figures came along
    for page in ("index.html", "getting-started/index.html", "quiet-star/objective/index.html", "coconut/paper-table/index.html",
                 "evaluation/index.html", "scale-out/launchers/index.html", "scale-out/zero/index.html", "troubleshooting/index.html",
                 "performance/index.html", "results/index.html", "testbed/index.html", "contributing/index.html",
                 "img/difficulty_champ.png", "img/tokens_html.png"):
        assert (site / page).is_file(), page
    api = (site / "api" / "quiet_star" / "index.html").read_text()
    assert "QuietStarModel" in api and "sample_thoughts" in api
    assert "Several nodes" in (site / "scale-out" / "launchers" / "index.html").read_text()  # launch/README.md was included
