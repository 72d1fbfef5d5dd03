"""The kernel microbenchmark runs and writes its stamped results (CPU: torch path only)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_kernel_benchmark_writes_stamped_results(tmp_path):
    out = tmp_path / "kernels"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--lengths", "512",
                    "--out", str(out)], check=True, capture_output=True, timeout=300)
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["stamp"]["machine"] and result["stamp"]["torch"]
    (row,) = result["rows"]
    assert row["n"] == 512 and row["impl"] == "torch"
    assert row["score_gbps"] > 0 and row["compact_gbps"] > 0
    # its plot, drawn by the same function tables.py redraws the committed ones with, says what it shows
    from PIL import Image

    with Image.open(out.with_suffix(".png")) as image:
        description = image.text["Description"]
    assert description.startswith("drawn from kernels.json (sha256 ")
    assert description.endswith(f"commit {result['stamp']['commit']}, {result['stamp']['date'][:10]}")


def test_each_plot_has_one_draw_function_that_tables_py_uses():
    """Every benchmark draws its PNG with one module-level draw(plt, result) (no copy inside main),
    and benchmarks/tables.py redraws the committed PNGs with those same functions."""
    import functools
    import importlib
    import re

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import tables

    used = set()
    for png in tables.PLOTS:
        draw = tables.PLOTS[png].draw()
        while isinstance(draw, functools.partial):
            draw = draw.func
        used.add(f"{draw.__module__}.{draw.__name__}")
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        source = path.read_text()
        assert not re.search(r"^[ \t]+def draw\(", source, re.M), f"{path.name} draws inside a function"
        if re.search(r"^def draw\(plt, result", source, re.M):
            module = importlib.import_module(path.stem)
            assert f"{module.__name__}.draw" in used, f"{path.name}: no committed plot is drawn by its draw()"
    assert "madakv_vllm.evaluation.report.draw_scores" in used


def test_accuracy_summary_of_a_stopped_run_has_n_and_intervals(tmp_path):
    """run_accuracy.py --summarize: the table of the samples a stopped run wrote, each score with
    its sample count and Wilson interval, and the measured KV kept per setting."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run_accuracy

    rows = []
    for i in range(10):
        for task, full in (("SyntheticPasskeyNeedle", 1.0), ("SyntheticTextNeedle", float(i < 8))):
            rows.append(dict(task=task, sample_id=str(i), policy="none", budget=None, score=full, kv_kept=1.0))
            rows.append(dict(task=task, sample_id=str(i), policy="snapkv", budget=0.2, score=float(i < 3),
                             kv_kept=0.2 + i / 500))
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_accuracy.summarize_samples(tmp_path)
    table = run_accuracy.markdown_table(tmp_path / "summary.csv")
    lines = table.splitlines()
    assert lines[0] == ("| setting | SyntheticPasskeyNeedle (n=10) | SyntheticTextNeedle (n=10) | mean (n=20) "
                        "| KV kept |")
    assert lines[2].startswith("| full cache | 1.00 [0.72, 1.00] | 0.80 [0.49, 0.94] | 0.90 [0.70, 0.97] |")
    assert lines[3].startswith("| snapkv 20% | 0.30 [0.11, 0.60] |") and lines[3].endswith("| 20.9% |")
    results = json.loads((tmp_path / "accuracy.json").read_text())
    assert {(r["policy"], r["task"], r["n"]) for r in results if r["task"] == "ALL"} == {("none", "ALL", 20),
                                                                                         ("snapkv", "ALL", 20)}
    # a second run's rows merged in with a suffix, each after the first run's row of its setting
    merged = run_accuracy.markdown_table(tmp_path / "summary.csv", (tmp_path / "summary.csv", " (vLLM)")).splitlines()
    assert [line.split(" | ")[0] for line in merged[2:]] == ["| full cache", "| full cache (vLLM)", "| snapkv 20%",
                                                            "| snapkv 20% (vLLM)"]
    assert merged[5].endswith("| 20.9% |")


def test_a_folder_grown_with_resume_lists_every_run_that_wrote_into_it(tmp_path, monkeypatch):
    """runs.md: a run with --resume adds its line (command, machine, commit) to the folder's list, a
    run without starts the list afresh; the test split's table names every run in its caption and
    pairs MadaKV with the full cache and with its earlier defaults on the same samples."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run_accuracy
    import tables

    out = tmp_path / "accuracy-vllm-test"
    out.mkdir()
    rows = [dict(task="SyntheticTextNeedle", sample_id=str(i), policy=policy, budget=budget, score=1.0)
            for i in range(4) for policy, budget in (("none", None), ("madakv", 0.2))]
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(run_accuracy, "RESULTS", tmp_path)
    monkeypatch.setattr(tables, "RESULTS", tmp_path)

    def run(*flags):
        monkeypatch.setattr(sys, "argv", ["run_accuracy.py", "--hf", "--summarize", "3", "--out", str(out), *flags])
        run_accuracy.main()

    run("--budgets", "0.2")
    run("--budgets", "0.1", "--resume")
    runs = (out / "runs.md").read_text().splitlines()
    assert len(runs) == 2 and "--budgets 0.2" in runs[0] and "--budgets 0.1 --resume" in runs[1]
    assert all("commit" in line and "3 min" in line for line in runs)
    for suffix, answered in (("-window8", "01"), ("-spans", "012")):  # earlier defaults on the same samples
        old = tmp_path / f"accuracy-vllm-test{suffix}"
        old.mkdir()
        (old / "samples.jsonl").write_text("".join(json.dumps(dict(r, score=float(r["sample_id"] in answered)))
                                                   + "\n" for r in rows))
    hf = tmp_path / "accuracy-test"  # a baseline served on the HF path only: it answered none
    hf.mkdir()
    (hf / "samples.jsonl").write_text("".join(json.dumps(dict(r, policy="pyramidkv", score=0.0)) + "\n"
                                              for r in rows if r["policy"] == "madakv"))
    caption = tables.accuracy_test()
    assert runs[0] in caption and runs[1] in caption and "| madakv 20% |" in caption
    assert "| 20% | full cache | +0.000 | 0 / 0 | 1.000 |" in caption
    assert "| 20% | pyramidkv (HF path) | +1.000 | 4 / 0 | 0.125 |" in caption
    assert "| 20% | the default before that (window 8, quotas as they fall) | +0.500 | 2 / 0 | 0.500 |" in caption
    assert "| 20% | the default before (quotas rounded up to whole spans) | +0.250 | 1 / 0 | 1.000 |" in caption
    run("--budgets", "0.5")
    assert len((out / "runs.md").read_text().splitlines()) == 1


def test_accuracy_results_carry_their_split_and_the_glance_shows_the_test_split_once_it_exists(tmp_path,
                                                                                              monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run_accuracy
    import tables

    def rows(policy, score):
        return [dict(setting="endpoint", policy=policy, budget=None if policy == "none" else budget, task="ALL",
                     score=score, n=500, ci_low=score - 0.05, ci_high=score + 0.05, kv_kept=None)
                for budget in tables.GLANCE_BUDGETS]

    monkeypatch.setattr(run_accuracy, "RESULTS", tmp_path)
    (tmp_path / "accuracy-vllm").mkdir()
    (tmp_path / "accuracy-vllm" / "accuracy.json").write_text(json.dumps(rows("madakv", 0.5) + rows("none", 0.9)))
    (tmp_path / "accuracy").mkdir()
    (tmp_path / "accuracy" / "accuracy.json").write_text(json.dumps(rows("snapkv", 0.6)))
    run_accuracy.merge_results()
    merged = json.loads((tmp_path / "accuracy.json").read_text())
    assert {r["split"] for r in merged} == {"dev"} and len(merged) == 9
    assert [m["score"] for _, _, m, _ in tables._glance_cells(merged)] == [0.5] * 3
    (tmp_path / "accuracy-vllm-test").mkdir()
    (tmp_path / "accuracy-vllm-test" / "accuracy.json").write_text(json.dumps(rows("madakv", 0.7) + rows("none", 0.9)))
    (tmp_path / "accuracy-test").mkdir()
    (tmp_path / "accuracy-test" / "accuracy.json").write_text(json.dumps(rows("snapkv", 0.65)))
    run_accuracy.merge_results()
    merged = json.loads((tmp_path / "accuracy.json").read_text())
    assert sorted({r["split"] for r in merged}) == ["dev", "test"] and tables._glance_split(merged) == "test"
    assert [(m["score"], best["score"]) for _, _, m, best in tables._glance_cells(merged)] == [(0.7, 0.65)] * 3
    with pytest.raises(SystemExit, match="neither the dev"):
        run_accuracy.run_dir(False, 7)


def test_ablation_variant_names_keep_their_meaning_when_a_default_changes():
    """A variant's name says what it changes; the rest stays what it was measured with (MPA's
    quotas in single tokens unless the name says spans, floors, nearest or caps; early chunks scored by
    their own window unless it names another score), so rows of runs from
    before and after a default changed can be pooled by name."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run_ablation
    from madakv_vllm.policies import MadaKV

    variants = run_ablation.variants(0.2)
    assert any(name.endswith("during prefill, appended") for name in variants)
    named = {"quota in spans": "spans", "quota floors": "floors", "quota floor": "floor", "quota nearest": "nearest",
             "quota caps": "caps"}
    for name, policy in variants.items():
        if isinstance(policy, MadaKV):
            quota = next((q for phrase, q in named.items() if phrase in name), "tokens")
            assert policy.mpa_quota == quota, name
            scores = next((s for s in ("running", "novelty", "ahead", "appended") if f"prefill, {s}" in name), "chunk")
            assert policy.prefill_scores == scores, name
