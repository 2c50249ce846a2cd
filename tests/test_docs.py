"""The repository stands on its own: docs/METHOD.md carries the spec with its equation numbers,
and the READMEs link only files inside the repository."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_METHOD = os.path.join(os.path.dirname(ROOT), "shared", "METHOD.md")
MARKDOWN = ["README.md", "docs/results.md", "eval/README.md", "train/README.md",
            "notebooks/README.md", "experiments/README.md"]


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        return handle.read()


def headings(text):
    return [line for line in text.splitlines() if line.startswith("## ")]


def test_in_repo_spec_has_every_numbered_section():
    spec = read("docs/METHOD.md")
    numbered = [h for h in headings(spec) if re.match(r"## \(\d+[a-z]?\)", h)]
    assert [h.split()[1] for h in numbered] == ["(1)", "(2)", "(3)", "(3b)", "(3c)", "(3d)", "(4)",
                                                "(5)", "(6)", "(7)"]


@pytest.mark.skipif(not os.path.exists(SHARED_METHOD), reason="no ../shared/METHOD.md beside the repository")
def test_in_repo_spec_keeps_every_line_of_the_shared_spec():
    """docs/METHOD.md may add clarifications, but every line of the shared spec is in it."""
    with open(SHARED_METHOD, encoding="utf-8") as handle:
        shared = handle.read().splitlines()
    ours = set(read("docs/METHOD.md").splitlines())
    missing = [line for line in shared if line not in ours]
    assert missing == [], missing[:5]


@pytest.mark.parametrize("path", MARKDOWN)
def test_markdown_links_point_inside_the_repository(path):
    directory = os.path.dirname(os.path.join(ROOT, path))
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", read(path)):
        if re.match(r"[a-z]+://", target):
            continue
        resolved = os.path.normpath(os.path.join(directory, target))
        assert resolved.startswith(ROOT + os.sep), f"{path} links {target}, outside the repository"
        assert os.path.exists(resolved), f"{path} links {target}, which does not exist"


def test_readme_commands_run_in_the_environment_of_command_one():
    """Every shell command the README shows uses the virtual environment that command 1 makes
    (a bare `python` would be the system's, without the package)."""
    blocks = re.findall(r"```bash\n(.*?)```", read("README.md"), flags=re.S)
    commands = [part.strip() for block in blocks for line in block.splitlines()
                for part in line.split("&&") if part.strip()]
    assert len(commands) > 10
    for command in commands:
        assert command.startswith((".venv/bin/", "python3 -m venv .venv")), command
