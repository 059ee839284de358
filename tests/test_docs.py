"""The documentation: the site builds with --strict, the README is a front page whose links
resolve, and no page names a module path that no longer exists."""

import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")


def _links(path):
    text = open(path, encoding="utf-8").read()
    return re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)


def test_readme_is_a_front_page():
    lines = open(README, encoding="utf-8").read().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; details belong in docs/"


def test_readme_links_resolve():
    missing = [
        link
        for link in _links(README)
        if not link.startswith(("http://", "https://"))
        and not os.path.exists(os.path.join(REPO, link))
    ]
    assert missing == []


def test_readme_test_command_is_what_ci_runs():
    # .ci/run executes exactly this line; the README must show it.
    ci = open(os.path.join(REPO, ".ci", "run"), encoding="utf-8").read()
    command = 'pip install -e ".[cpu,test]" && python -m pytest -q tests'
    assert command in ci
    assert command in open(README, encoding="utf-8").read()


def test_docs_name_existing_module_files():
    stale = []
    for root, _, files in os.walk(os.path.join(REPO, "docs")):
        for name in files:
            if not name.endswith(".md"):
                continue
            path = os.path.join(root, name)
            for module in re.findall(
                r"`(kd_keras/[\w/]+\.py)`", open(path, encoding="utf-8").read()
            ):
                if "foo" not in module and not os.path.exists(os.path.join(REPO, module)):
                    stale.append(f"{os.path.relpath(path, REPO)}: {module}")
    assert stale == []


@pytest.mark.skipif(
    shutil.which("mkdocs") is None
    and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "mkdocs")),
    reason="mkdocs not installed",
)
def test_site_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs") or os.path.join(os.path.dirname(sys.executable), "mkdocs")
    done = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "methods" / "index.html").exists()
