"""The perplexity report's ``tokens.html`` in a real browser: headless Chromium (optional).

Skipped unless Chromium is installed (Debian: ``apt-get install chromium``; another binary
through ``$CHROMIUM``). The report is the one ``tests/test_perplexity_report.py`` writes from
its tiny fixtures (a random Llama, a few documents). Chromium loads a copy of the page with
two probe scripts added: the first, before anything else, records script errors, resources
that fail to load and ``console.error``/``console.warn`` calls; the second, after load,
measures what is on the first screen. ``--dump-dom`` brings the probe's findings back, and
``--enable-logging=stderr`` shows every console message (the page itself has no script, so
the probe's own line must be the only one). A second run takes a screenshot of the page as
it is; with ``QUIETSTAR_SCREENSHOT=PATH`` it is also copied to PATH (that is how
``docs/img/tokens_html.png`` was made).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import pytest

from test_perplexity_report import report  # noqa: F401 (the module-scoped fixture: runs the perplexity CLI once)

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")

WINDOW = (1280, 1000)
PROBE_FIRST = """<script>
window.__problems = [];
window.addEventListener("error", (e) => {
  const t = e.target;
  window.__problems.push(t && t !== window ? "failed to load: " + (t.src || t.href || t.tagName) : "error: " + e.message);
}, true);
window.addEventListener("unhandledrejection", (e) => window.__problems.push("unhandled rejection: " + e.reason));
for (const level of ["error", "warn"]) {
  const original = console[level];
  console[level] = (...args) => { window.__problems.push(level + ": " + args.join(" ")); original.apply(console, args); };
}
</script>"""
PROBE_LAST = """<script>
window.addEventListener("load", () => {
  // on the first screen, not hidden, not covered: the element (or a child) is what is drawn at its centre
  function shown(el) {
    if (!el) return false;
    const s = getComputedStyle(el), r = el.getClientRects()[0];
    if (!r || r.width <= 0 || r.height <= 0 || s.visibility !== "visible" || s.display === "none" || +s.opacity === 0) return false;
    const x = r.left + r.width / 2, y = r.top + r.height / 2;
    if (x < 0 || y < 0 || x >= innerWidth || y >= innerHeight) return false;
    const hit = document.elementFromPoint(x, y);
    return hit === el || el.contains(hit);
  }
  function strength(el) {  // how far the background is from white and from grey: 0 for none
    const m = getComputedStyle(el).backgroundColor.match(/[\\d.]+/g).map(Number);
    if (m.length === 4 && m[3] === 0) return 0;
    return Math.max(...m.slice(0, 3)) - Math.min(...m.slice(0, 3));
  }
  const summary = document.querySelector("table.summary");
  const tokens = [...document.querySelectorAll("span.tok")];
  const highlighted = tokens.filter((t) => strength(t) >= 40 && shown(t));
  const result = {
    problems: window.__problems,
    summary_shown: shown(summary),
    summary_text: summary ? summary.innerText : "",
    tokens: tokens.length,
    highlighted_shown: highlighted.length,
    // the text wraps inside its column: nothing wider than the page (a long run of tokens without spaces included)
    text_overflow: Math.max(0, ...[...document.querySelectorAll(".text")].map((el) => el.scrollWidth - el.clientWidth)),
    page_overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth,
    first_highlighted: highlighted.length ? {text: highlighted[0].textContent, title: highlighted[0].title,
                                             background: getComputedStyle(highlighted[0]).backgroundColor} : null,
  };
  document.documentElement.setAttribute("data-probe", JSON.stringify(result));
  console.log("quietstar-probe done");
});
</script>"""


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
             "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


class Root(HTMLParser):
    """The attributes of the ``<html>`` element."""

    attrs: dict[str, str | None] = {}

    def handle_starttag(self, tag, attrs):
        if tag == "html":
            self.attrs = dict(attrs)


@pytest.fixture(scope="module")
def page(report, tmp_path_factory):  # noqa: F811 (pytest passes the imported fixture)
    """(tokens.html, the probe's findings, Chromium's console lines, the screenshot)."""
    _, out_dir, _ = report
    tokens_html = out_dir / "tokens.html"
    tmp = tmp_path_factory.mktemp("browser")
    text = tokens_html.read_text(encoding="utf-8")
    assert text.count("<head>") == 1 and text.count("</body>") == 1
    probe = tmp / "probe.html"
    probe.write_text(text.replace("<head>", "<head>\n" + PROBE_FIRST, 1).replace("</body>", PROBE_LAST + "\n</body>", 1), encoding="utf-8")
    run = chromium(tmp, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    assert run.returncode == 0, run.stderr[-3000:]
    root = Root()
    root.feed(run.stdout)
    assert root.attrs.get("data-probe"), f"the probe did not run; Chromium said:\n{run.stderr[-3000:]}"
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    shot = tmp / "tokens_html.png"
    run = chromium(tmp, f"--screenshot={shot}", tokens_html.as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-3000:]
    if os.environ.get("QUIETSTAR_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["QUIETSTAR_SCREENSHOT"])
    return tokens_html, json.loads(root.attrs["data-probe"]), console, shot


def test_tokens_html_has_no_console_errors(page):
    _, probe, console, _ = page
    assert probe["problems"] == []
    # the probe's own message is the one console line (so the log is being read), and nothing else wrote to the console
    assert len(console) == 1 and re.search(r'"quietstar-probe done"', console[0]), console


def test_tokens_html_shows_the_summary_and_highlighted_tokens(page, report):  # noqa: F811
    _, _, data = report
    _, probe, _, _ = page
    assert probe["summary_shown"]
    for name in ("tokens scored", "base NLL / perplexity", "talk NLL / perplexity", "talk NLL with shuffled thoughts (control)"):
        assert name in probe["summary_text"]
    assert f"{data['base_nll']:.4f}" in probe["summary_text"] and f"{data['talk_nll']:.4f}" in probe["summary_text"]
    assert probe["tokens"] == data["tokens"]
    assert probe["highlighted_shown"] >= 1, probe
    token = probe["first_highlighted"]
    assert token["text"].strip() and "base NLL" in token["title"] and "thought before it: <sot>" in token["title"]


def test_screenshot_shows_a_coloured_page(page):
    _, _, _, shot = page
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (WINDOW[1], WINDOW[0])
    rgb = pixels[..., :3]
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.15  # pixels far from grey: the highlighted tokens
    assert coloured.mean() > 0.001 and (rgb < 0.3).all(axis=-1).mean() > 0.001  # some colour, and dark text


def test_tokens_html_wraps_long_unbroken_text_inside_the_page(page):
    """The tests' word-level tokens render without spaces between them: one long run that must still wrap."""
    _, probe, _, _ = page
    assert probe["text_overflow"] == 0 and probe["page_overflow"] <= 0, probe
