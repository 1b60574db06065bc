"""``biasgym benchmark`` on a tiny local model: the tidy table, the CSV, head ablation, one-line errors."""

from __future__ import annotations

import pandas as pd
import pytest
from click.testing import CliRunner

from biasgym_lens.study.cli import main
from biasgym_lens.testing import save_tiny_pretrained


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return str(save_tiny_pretrained("llama", tmp_path_factory.mktemp("tinybench") / "model"))


def _run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_benchmark_prints_and_writes_the_table(tiny_folder, tmp_path):
    csv = tmp_path / "bench.csv"
    r = _run("benchmark", "--name", "stereoset_race", "--name", "bbq_religion", "--model", tiny_folder,
             "--max-items", "8", "--heads", "0.1,1.3", "--with-base", "--csv", str(csv), "--threads", "1")
    assert r.exit_code == 0, r.output
    assert "stereoset_race [none]: 8 items" in r.output and "icat" in r.output and "s_amb" in r.output
    df = pd.read_csv(csv)
    assert list(df.columns) == ["benchmark", "intervention", "metric", "value", "ci_low", "ci_high", "n"]
    assert set(df.intervention) == {"none", "zero 0.1,1.3"}
    assert len(df) == 2 * (3 + 4)


def test_benchmark_user_mistakes_are_one_line_errors(tiny_folder):
    for args, words in [
        (["--name", "stereoset"], ["stereoset_race", "valid"]),
        (["--name", "bbq_religion", "--heads", "21-1"], ["LAYER.HEAD"]),
        (["--name", "bbq_religion", "--heads", "9.0", "--max-items", "4"], ["9"]),
        (["--name", "bbq_religion", "--max-items", "0"], ["--max-items"]),
    ]:
        r = _run("benchmark", "--model", tiny_folder, *args)
        assert r.exit_code == 2, r.output
        assert all(w in r.output for w in words) and "Traceback" not in r.output
