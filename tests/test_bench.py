"The benchmark command: runs as a module and as a console script, rejects unknown names in one line."
import subprocess, sys

import pytest

from gat_tutorial import bench


def test_unknown_benchmark_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["nope"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown benchmark 'nope'" in err and "blocks" in err


def test_module_entry_point_runs_blocks():
    out = subprocess.run([sys.executable, "-m", "gat_tutorial.bench", "blocks", "--repeats", "1"],
                         capture_output=True, text=True, check=True).stdout
    assert "ratio ours/timm ViT" in out and "ratio ours/timm same-features" in out
