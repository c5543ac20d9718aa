"""The documentation: `mkdocs build --strict` passes (no broken link, no page missing from the nav), and every shell
block of README.md and docs/*.md is accounted for by the HTML comment right before it:

    <!-- docs-test: run; setup=corpus; launch.train+=--config.train.steps=2 ...; launch.generate+=... -->
    <!-- docs-test: not run: REASON -->

`run` blocks are executed (bash, in a fresh temporary directory, `python` being this venv's and the checkout on
PYTHONPATH), each `MODULE+=ARGS` appended to every command line that runs `python -m MODULE` (toy sizes: the last
value of a repeated flag wins); `setup=corpus` writes a small corpus/ and heldout/ of standard-library source
first. A block with no marker fails the test, so a new command cannot enter the docs unchecked."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO

MARKER = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")
SHELL = ("bash", "sh", "shell", "console")


def shell_blocks() -> list[tuple[str, int, str, str]]:
    """(file, line, marker text or '', block text) for every fenced shell block."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            fence = re.match(r"^```(\w*)", lines[i])
            if not fence:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if fence.group(1) in SHELL:
                prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
                m = MARKER.search(prev)
                found.append((str(path.relative_to(REPO)), i + 1, m.group(1) if m else "", "\n".join(lines[i + 1:end])))
            i = end + 1
    return found


BLOCKS = shell_blocks()


def test_mkdocs_builds_strict(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    out = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "site" / "handoffs" / "index.html").is_file()


def test_every_shell_block_is_run_or_says_why_not():
    unmarked = [f"{f}:{line}" for f, line, marker, _ in BLOCKS if not marker]
    assert not unmarked, f"shell blocks without a <!-- docs-test: ... --> marker: {unmarked}"
    bad = [f"{f}:{line}: {marker}" for f, line, marker, _ in BLOCKS
           if not (marker.startswith("run") or re.match(r"not run: \S", marker))]
    assert not bad, bad
    assert any(m.startswith("run") for _, _, m, _ in BLOCKS)


def commands(block: str) -> list[str]:
    """Command lines of a block, continuation lines joined, comments dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", block)
    return [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def test_commands_join_continuations_and_drop_comments():
    assert commands("a --x \\\n    --y  # note\n# c\nb") == ["a --x --y", "b"]


def write_corpus(root: Path) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name, files in (("corpus", ("argparse.py", "shlex.py", "textwrap.py", "csv.py")), ("heldout", ("glob.py",))):
        (root / name).mkdir()
        for f in files:
            shutil.copy(stdlib / f, root / name / f"{Path(f).stem}.txt")


@pytest.mark.parametrize("where, block", [(f"{f}:{line}", (marker, text)) for f, line, marker, text in BLOCKS
                                          if marker.startswith("run")])
def test_documented_commands_run(where, block, tmp_path):
    marker, text = block
    options = [part.strip() for part in marker.split(";")[1:]]
    appends = dict(part.split("+=", 1) for part in options if "+=" in part)
    if "setup=corpus" in options:
        write_corpus(tmp_path)
    script = []
    for line in commands(text):
        m = re.match(r"python -m (\S+)", line)
        if m and m.group(1) in appends:
            line += " " + appends[m.group(1)]
        script.append(line)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(script)], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, f"{where}: exit {out.returncode}\n" + "\n".join(script) + "\n" + out.stderr[-3000:]
