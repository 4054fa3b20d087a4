"""The documentation keeps up with the code: the generated flag reference is current, the README stays a front
page, and every relative link in it leads to a file of the repository."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_WORDS = 1100
# [text](target) and [text](target "title"); images too. Reference-style links are not used in the README.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _flag_reference():
    spec = importlib.util.spec_from_file_location("flag_reference", ROOT / "tools" / "flag_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _without_code(text: str) -> str:
    """Markdown outside fenced blocks and inline code spans: links shown as code are not links."""
    text = re.sub(r"^(`{3,}|~{3,}).*?^\1", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def test_flag_reference_is_current():
    problem = _flag_reference().check()
    assert problem is None, problem


def test_readme_is_a_front_page():
    words = len(README.read_text(encoding="utf-8").split())  # as `wc -w` counts
    assert words <= README_MAX_WORDS, f"README.md has {words} words (at most {README_MAX_WORDS}): move text to docs/"


def test_readme_relative_links_exist():
    targets = LINK.findall(_without_code(README.read_text(encoding="utf-8")))
    assert targets, "no links found in README.md: has the link pattern stopped matching?"
    missing = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor in the README itself
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not (ROOT / path).exists():
            missing.append(target)
    assert not missing, f"README.md links to files that do not exist: {', '.join(missing)}"
