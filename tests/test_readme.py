"""The README's HF example runs as written (in a scratch directory)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_hf_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    block = re.search(r"<!-- hf-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its HF example"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 16
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()[-1].split()
    prompt_len, kept_ratio = int(printed[0]), float(printed[-1])
    assert prompt_len > 50
    assert abs(kept_ratio - 0.3) < 1 / prompt_len + 1e-9  # the budget, up to rounding


def test_readme_tables_match_the_committed_results():
    """Every marked table is what `python benchmarks/tables.py --readme` renders from the
    stamped results JSON, so README numbers cannot drift from benchmarks/results/."""
    import sys

    sys.path.insert(0, str(README.parent / "benchmarks"))
    import tables

    text = README.read_text()
    marked = re.findall(r"<!-- table:(\w+) -->\n(.*?)\n<!-- /table:\1 -->", text, re.S)
    assert {name for name, _ in marked} == set(tables.TABLES)
    for name, body in marked:
        assert body == tables.render(name), f"README table {name!r} is stale: run python benchmarks/tables.py --readme"
