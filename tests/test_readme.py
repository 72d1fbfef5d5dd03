"""The README and docs/: the HF example runs as written, every result table and every embedded plot
is what benchmarks/tables.py renders from the stamped results, and every local link resolves."""
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
sys.path.insert(0, str(ROOT / "benchmarks"))

import tables  # noqa: E402


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


def test_readme_stays_short():
    assert len(README.read_text().splitlines()) <= 250


def test_every_table_is_on_one_page_as_its_results_render_it():
    """README.md and docs/*.md together show every table of tables.TABLES exactly once, and each
    marked block is what `python benchmarks/tables.py` renders from benchmarks/results/ now."""
    shown = {}
    for page in tables.pages():
        for name, body in tables.marked_tables(page):
            assert name not in shown, f"table {name!r} is on both {shown[name]} and {page.name}"
            shown[name] = page.name
            assert body == tables.render(name), (f"{page.name}: table {name!r} is stale: run "
                                                 "python benchmarks/tables.py")
    assert set(shown) == set(tables.TABLES), f"on no page: {set(tables.TABLES) - set(shown)}"


def test_table_refresh_covers_every_page_and_keeps_the_readme_alias(tmp_path):
    page, other = tmp_path / "a.md", tmp_path / "b.md"
    page.write_text("intro\n<!-- table:video -->\nold numbers\n<!-- /table:video -->\nend\n")
    other.write_text("<!-- table:stress -->\n<!-- /table:stress -->\n")  # a new, empty block
    assert tables.refresh_tables([page, other]) == {"a.md": ["video"], "b.md": ["stress"]}
    assert tables.marked_tables(page) == [("video", tables.render("video"))]
    assert tables.marked_tables(other) == [("stress", tables.render("stress"))]
    assert page.read_text().startswith("intro\n") and page.read_text().endswith("end\n")
    page.write_text("<!-- table:lengths -->\nold\n<!-- /table:lengths -->\n")
    assert tables.refresh_readme(page) == ["lengths"]
    assert tables.marked_tables(page) == [("lengths", tables.render("lengths"))]


def test_captions_name_the_machine_of_their_stamp():
    """A table says where it ran from the JSON's stamp, never from prose."""
    for name in ("serving", "overhead", "video", "kernels", "stress", "layer_groups", "lengths"):
        stamp = json.loads((tables.RESULTS / f"{name}.json").read_text())["stamp"]
        caption = tables.render(name).splitlines()[0]
        assert stamp["machine"] in caption and f"commit {stamp['commit']}" in caption, name


def test_every_embedded_plot_is_drawn_from_its_json():
    """Each PNG on a page names, in its metadata, the SHA-256 of the JSON it was drawn from and of
    the code that drew it: a PNG drawn from older data (or by older code) fails here."""
    from PIL import Image

    embedded = tables.embedded_plots()
    assert {"benchmarks/results/serving-glance.png", "benchmarks/results/accuracy-glance.png"} <= set(embedded)
    for png, pages in embedded.items():
        assert png in tables.PLOTS, f"{png} (on {pages}) has no JSON source in tables.PLOTS"
        with Image.open(ROOT / png) as image:
            description = image.text.get("Description")
        assert description == tables.plot_description(png), (f"{png} is stale: run python benchmarks/tables.py")
        assert f"drawn from {tables.PLOTS[png].source} " in description


def test_a_plot_drawn_from_other_data_reads_as_stale(tmp_path):
    from _stamp import plot_description

    png = "benchmarks/results/serving.png"
    draw, result, stamp = tables._plot_inputs(png)
    result["rows"][0]["output_tok_s"] += 1
    changed = tmp_path / "serving.json"
    changed.write_text(json.dumps(result, indent=2))
    assert plot_description(draw, changed, stamp) != tables.plot_description(png)
    assert plot_description(draw, ROOT / tables.PLOTS[png].source, stamp) == tables.plot_description(png)


@pytest.mark.parametrize("png", sorted(tables.PLOTS))
def test_plots_are_titled_with_their_stamp_and_drawn_deterministically(png, tmp_path):
    import matplotlib.pyplot as plt

    _, _, stamp = tables._plot_inputs(png)
    fig = tables.figure(png)
    title = fig._suptitle.get_text()
    plt.close(fig)
    for s in stamp if isinstance(stamp, list) else [stamp]:
        assert f"commit {s['commit']}" in title and (s.get("gpu") or s["machine"]) in title
    first, second = tmp_path / "1.png", tmp_path / "2.png"
    assert tables.draw_plot(png, first) == tables.draw_plot(png, second) == tables.plot_description(png)
    assert first.read_bytes() == second.read_bytes()


def test_budget_axes_read_as_percentages():
    fig = tables.figure("benchmarks/results/accuracy-vllm/scores.png")
    fig.canvas.draw()
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["5 %", "10 %", "20 %", "50 %"]
    assert not any("10^" in t.get_text() or "$" in t.get_text() for ax in fig.axes for t in ax.get_xticklabels())


def _anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_local_links_resolve():
    """Every relative link in README.md and docs/*.md points to a file that exists (and, with a
    #fragment into a Markdown page, to one of its headings)."""
    broken = []
    for page in tables.pages():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, fragment = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif fragment and file.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", file.read_text(), flags=re.S), re.M)
                if fragment not in {_anchor(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
