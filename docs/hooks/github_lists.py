"""MkDocs hook: render lists written GitHub's way (the pages, and the READMEs they include).

GitHub starts a list right after a paragraph line and nests lists two spaces deep;
Python-Markdown needs a blank line before a list and four spaces per level. This hook adds
a Markdown preprocessor, run after pymdownx.snippets has included its files, that inserts
the blank line and doubles the indentation inside lists (a code block inside a list keeps
its own relative indentation). Text outside lists and code blocks outside lists are untouched.
"""

from __future__ import annotations

import re

from markdown import Extension
from markdown.preprocessors import Preprocessor

LIST_ITEM = re.compile(r"^( *)([-*+]|\d+[.)]) \S")
FENCE = re.compile(r"^( *)(`{3,}|~{3,})")


def github_lists(lines: list[str]) -> list[str]:
    """The lines with a blank line before each top-level list and list indentation doubled."""
    out: list[str] = []
    in_list = False
    item_indent, blank_since_item = 0, False  # the last list item's indentation; a blank line since it
    fence: tuple[str, int] | None = None  # (marker, shift) of an open code fence
    for line in lines:
        if fence is not None:
            marker, shift = fence
            out.append(" " * shift + line if line.strip() else line)
            match = FENCE.match(line)
            if match and match.group(2).startswith(marker) and not line[match.end():].strip():
                fence = None
            continue
        indent = len(line) - len(line.lstrip(" "))
        match = FENCE.match(line)
        if match:
            shift = indent if (in_list and indent) else 0
            fence = (match.group(2), shift)
            out.append(" " * shift + line)
            continue
        if not line.strip():
            blank_since_item = True
            out.append(line)
            continue
        item = LIST_ITEM.match(line)
        new_indent = indent * 2 if in_list else indent
        if item and out and out[-1].strip() and not LIST_ITEM.match(out[-1]):
            # Python-Markdown starts a list, a nested list, or an item after a paragraph of a
            # loose item only after a blank line; a tight item's continuation lines need none
            if not in_list or new_indent > item_indent or blank_since_item:
                out.append("")
        if item:
            item_indent, blank_since_item = (0 if indent == 0 else new_indent), False
        if indent == 0:
            if item:
                in_list = True
            elif not (out and out[-1].strip() and in_list):
                in_list = False  # a paragraph after a blank line ends the list; a line right after an item continues it
            out.append(line)
            continue
        out.append(" " * indent + line if in_list else line)
    return out


class _GithubLists(Preprocessor):
    def run(self, lines: list[str]) -> list[str]:
        return github_lists(lines)


class GithubListsExtension(Extension):
    def extendMarkdown(self, md) -> None:  # noqa: N802 (Python-Markdown's name)
        md.preprocessors.register(_GithubLists(md), "github_lists", 20)  # after snippets (32)


def on_config(config):
    config.markdown_extensions.append(GithubListsExtension())
    return config
