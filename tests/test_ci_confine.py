"""The audit hook `.ci/run` puts in every test python (.ci/confine.py): an access under a forbidden directory
fails and is logged, one elsewhere is untouched."""

import os
import subprocess
import sys

from conftest import REPO


def test_confine_hook_refuses_and_logs_access_under_a_forbidden_directory(tmp_path):
    forbidden, allowed = tmp_path / "shared", tmp_path / "tree"
    forbidden.mkdir()
    allowed.mkdir()
    (forbidden / "data.txt").write_text("x")
    (allowed / "ok.txt").write_text("y")
    log = tmp_path / "log"
    code = (f"exec(open({str(REPO / '.ci' / 'confine.py')!r}).read())\n"
            f"print(open({str(allowed / 'ok.txt')!r}).read())\n"
            f"try:\n    open({str(forbidden / 'data.txt')!r})\nexcept PermissionError as e:\n    print('refused', e)\n"
            f"try:\n    os.listdir({str(forbidden)!r})\nexcept PermissionError:\n    print('refused listdir')\n")
    env = dict(os.environ, ULTRATHINK_CONFINE_FORBID=str(forbidden), ULTRATHINK_CONFINE_LOG=str(log))
    out = subprocess.run([sys.executable, "-c", "import os\n" + code], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == "y" and out[1].startswith("refused opened outside the tree: open ") and out[2] == "refused listdir"
    logged = log.read_text().splitlines()
    assert len(logged) == 2 and str(forbidden / "data.txt") in logged[0] and "os.listdir" in logged[1], logged
