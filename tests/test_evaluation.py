"""MileBench reader and scoring, the synthetic generator's determinism, and `madakv-eval`
against a fake OpenAI endpoint."""
import csv
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from madakv_vllm.evaluation import cli, synthetic
from madakv_vllm.evaluation.milebench import (
    all_words_match,
    choice_accuracy,
    exact_match,
    list_tasks,
    load_task,
    rouge_l,
    scorer_for,
    substring_match,
)
from madakv_vllm.testing import vision
from madakv_vllm.vllm.metrics import parse_metrics_page, sum_modalities


@pytest.fixture
def milebench_root(tmp_path):
    """A two-sample task folder written the way MileBench ships them."""
    folder = tmp_path / "ALFRED"
    (folder / "images").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8), "red").save(folder / "images" / name)
    payload = {"meta_data": {"task_instruction": ["Look at the frames. ", "Answer briefly. "],
                             "question_type": "multi-choice"},
               "data": [{"sample_id": 7, "task_instruction_id": 1,
                         "task_instance": {"context": "First {image#1} then {table#2} done.",
                                           "images_path": ["a.jpg", "b.jpg"],
                                           "choice_list": ["open the door", "close the door"]},
                         "response": "close the door"},
                        {"sample_id": 8, "task_instruction_id": 0,
                         "task_instance": {"context": "No pictures here.", "images_path": []},
                         "response": "a cat sat on the mat"}]}
    (folder / "ALFRED.json").write_text(json.dumps(payload))
    return tmp_path


def test_reader_builds_prompts_in_order(milebench_root):
    assert list_tasks(milebench_root) == ["ALFRED"]
    first, second = load_task(milebench_root, "ALFRED")
    assert (first.sample_id, first.instruction, first.answer) == ("7", "Answer briefly. ", "close the door")
    parts = first.parts()
    assert [kind for kind, _ in parts] == ["text", "image", "text", "image", "text"]
    assert parts[0] == ("text", "Answer briefly. First ")
    assert parts[1][1].name == "a.jpg" and parts[3][1].name == "b.jpg"
    assert parts[-1][1].startswith(" done.Choice list:['open the door', 'close the door']")
    assert second.parts() == [("text", "Look at the frames. No pictures here.")]
    assert load_task(milebench_root, "ALFRED", limit=1) == [first]
    with pytest.raises(FileNotFoundError):
        load_task(milebench_root, "Missing")


def test_scoring_rules(milebench_root):
    choices = ["open the door", "close the door"]
    assert choice_accuracy("B", "close the door", choices) == 1.0
    assert choice_accuracy("(A) open", "close the door", choices) == 0.0
    assert choice_accuracy("I would close the door.", "close the door", choices) == 1.0
    assert choice_accuracy("no idea", "close the door", choices) == 0.0
    assert exact_match("Walrus.", "walrus", []) == 1.0 and exact_match("the walrus", "walrus", []) == 0.0
    assert substring_match("the walrus", "walrus", []) == 1.0
    assert all_words_match("The secret color is red and the secret word is tiger.", "red tiger", []) == 1.0
    assert all_words_match("The secret word is tiger.", "red tiger", []) == 0.0
    assert all_words_match("The secret color is reddish, the word tigers.", "red tiger", []) == 0.0
    assert rouge_l("a cat sat on the mat", "a cat sat on the mat", []) == 1.0
    assert 0.0 < rouge_l("a cat on a mat", "a cat sat on the mat", []) < 1.0
    first, second = load_task(milebench_root, "ALFRED")
    assert scorer_for(first) is choice_accuracy and scorer_for(second) is rouge_l
    needle = load_task(synthetic.generate(milebench_root / "syn", samples=1)[1].parent.parent,
                       "SyntheticTextNeedle")[0]
    assert scorer_for(needle) is substring_match
    needle.task = "TextNeedleInAHaystack"
    assert scorer_for(needle) is exact_match


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_generator_is_deterministic_and_spans_lengths(tmp_path, monkeypatch):
    lengths = ("1k", "2k", "4k", "8k")
    synthetic.generate(tmp_path / "a", samples=4, seed=3, lengths=lengths)
    synthetic.generate(tmp_path / "b", samples=4, seed=3, lengths=lengths)
    synthetic.generate(tmp_path / "c", samples=4, seed=4, lengths=lengths)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    assert list_tasks(tmp_path / "a") == ["SyntheticImageNeedle", "SyntheticMixedNeedle",
                                          "SyntheticNoisyPicturesNeedle", "SyntheticPasskeyNeedle",
                                          "SyntheticTextNeedle"]
    samples = load_task(tmp_path / "a", "SyntheticTextNeedle")
    words = [len(s.context.split()) for s in samples]
    assert words == sorted(words) and words[0] < 1000 < 5000 < words[-1]
    assert [len(s.image_paths) for s in samples] == [images for _, images in synthetic.LENGTHS.values()]
    for s in samples:
        # the fact sits between two sentences of a paragraph, never glued to an image placeholder
        assert f"The secret word is {s.answer}." in s.context and s.answer in synthetic.SECRETS
        assert "}The secret" not in s.context and ".. " not in s.context
        assert s.context.index("{image#1}") < s.context.index("The secret word")  # never in the first paragraph
        # the question comes before the text (the instruction) and after it
        assert "What is the secret word?" in s.instruction and s.context.endswith("What is the secret word?")
        assert all(p.is_file() for p in s.image_paths) and scorer_for(s) is substring_match
    keys = load_task(tmp_path / "a", "SyntheticPasskeyNeedle")
    for s in keys:
        assert s.answer.isdigit() and f"The pass key is {s.answer}. Remember it. {s.answer} is" in s.context
        assert "What is the pass key?" in s.instruction and s.context.endswith("What is the pass key?")
    assert len({s.answer for s in keys}) > 1
    # the default is one length (about 1K tokens), and a length it does not know is refused
    synthetic.generate(tmp_path / "e", samples=2, seed=3)
    assert {len(s.image_paths) for s in load_task(tmp_path / "e", "SyntheticTextNeedle")} == {4}
    with pytest.raises(ValueError, match="unknown lengths"):
        synthetic.generate(tmp_path / "f", samples=2, lengths=("3k",))
    # adding or removing a task does not change the others: each task has its own seed
    monkeypatch.delitem(synthetic.TASKS, "SyntheticPasskeyNeedle")
    synthetic.generate(tmp_path / "d", samples=4, seed=3, lengths=lengths)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["SyntheticImageNeedle", "SyntheticMixedNeedle",
                                                                  "SyntheticNoisyPicturesNeedle", "SyntheticTextNeedle"]
    assert digest(tmp_path / "d" / "SyntheticTextNeedle") == digest(tmp_path / "a" / "SyntheticTextNeedle")


def word_pictures(sample) -> list[int]:
    """Indices of the sample's pictures that show a word (light paper covers most of such a picture;
    the haystack's pictures are coloured squares)."""
    from PIL import Image

    shown = []
    for i, path in enumerate(sample.image_paths):
        _, colour = max(Image.open(path).convert("RGB").getcolors(56 * 56))
        shown += [i] if colour in vision.PAPER_COLORS else []
    return shown


def test_image_and_mixed_needles_put_the_answer_in_one_picture(tmp_path):
    synthetic.generate(tmp_path, samples=6, seed=0)
    for s in load_task(tmp_path, "SyntheticTextNeedle") + load_task(tmp_path, "SyntheticPasskeyNeedle"):
        assert word_pictures(s) == []
    for s in load_task(tmp_path, "SyntheticImageNeedle"):
        assert len(word_pictures(s)) == 1 and s.answer in vision.WORD_PICTURES
        assert s.answer not in s.context and "secret word" not in s.context.replace("What is the secret word?", "")
        assert scorer_for(s) is substring_match
    mixed = load_task(tmp_path, "SyntheticMixedNeedle")
    for s in mixed:
        color, word = s.answer.split()
        assert len(word_pictures(s)) == 1 and word in vision.WORD_PICTURES and word not in s.context
        assert f"The secret color is {color}." in s.context and color in synthetic.SECRET_COLORS
        assert s.context.index("{image#1}") < s.context.index("The secret color")
        assert s.context.endswith(synthetic.MIXED_QUESTION) and scorer_for(s) is all_words_match
    assert len({word_pictures(s)[0] for s in mixed}) > 1  # the needle picture moves
    for s in load_task(tmp_path, "SyntheticNoisyPicturesNeedle"):  # six noise pictures per usual picture
        assert len(s.image_paths) == 6 * 4 and word_pictures(s) == []
        assert f"The secret word is {s.answer}." in s.context and s.context.endswith("What is the secret word?")
        colours = len(Image.open(s.image_paths[0]).convert("RGB").getcolors(56 * 56) or range(56 * 56))
        assert colours > 1000  # noise, not three squares on a background


class FakeOpenAI(BaseHTTPRequestHandler):
    """Answers right only when eviction is off for the request; records what it was sent; exports
    eviction counters at /metrics the way the plugin does (kept share = the request's budget)."""

    seen: list = []
    counters: dict = {}
    resets = 0

    def log_message(self, *args):
        pass

    def _send(self, payload):
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/metrics":
            c = FakeOpenAI.counters
            body = "\n".join([
                "# HELP vllm:kv_eviction_requests_total Requests whose KV cache was evicted",
                f"vllm:kv_eviction_requests_total {c.get('requests', 0.0)}",
                "vllm:kv_eviction_requests_created 1.7e9",
                f"vllm:kv_eviction_blocks_freed_total {c.get('blocks', 0.0)}",
                f'vllm:kv_eviction_tokens_kept_total{{modality="text"}} {c.get("kept", 0.0) / 2}',
                f'vllm:kv_eviction_tokens_kept_total{{modality="image"}} {c.get("kept", 0.0) / 2}',
                f'vllm:kv_eviction_tokens_evicted_total{{modality="text"}} {c.get("evicted", 0.0)}',
                'vllm:kv_eviction_tokens_evicted_total{modality="video"} 0.0', ""]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self._send({"object": "list", "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "me"}]})

    def do_POST(self):
        if self.path == "/reset_prefix_cache":  # a server in dev mode
            FakeOpenAI.resets += 1
            self._send({})
            return
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.seen.append(request)
        text = " ".join(p["text"] for p in request["messages"][0]["content"] if p["type"] == "text")
        images = sum(p["type"] == "image_url" for p in request["messages"][0]["content"])
        text = text.lower()
        secret = text.split("the secret word is ")[1].split(".")[0] if "secret word is" in text else "?"
        answer = secret if request["vllm_xargs"]["kv_eviction"] == "none" else "pass"
        prompt_tokens = len(text.split()) + 16 * images
        if "kv_eviction_budget" in request["vllm_xargs"]:
            budget, c = request["vllm_xargs"]["kv_eviction_budget"], FakeOpenAI.counters
            for key, amount in (("requests", 1), ("blocks", 5), ("kept", budget * prompt_tokens * 30),
                                ("evicted", (1 - budget) * prompt_tokens * 30)):
                c[key] = c.get(key, 0.0) + amount
        self._send({"id": "x", "object": "chat.completion", "created": 0, "model": "fake",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": answer}}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1,
                              "total_tokens": 1}})


def test_eval_cli_sweeps_policies_and_budgets_against_an_endpoint(tmp_path):
    synthetic.generate(tmp_path / "data", samples=3, seed=0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeOpenAI.seen, FakeOpenAI.counters = [], {}
    try:
        code = cli.main(["--data", str(tmp_path / "data"), "--tasks", "SyntheticTextNeedle", "--endpoint",
                         f"http://127.0.0.1:{server.server_address[1]}/v1", "--policies", "none", "madakv",
                         "--budgets", "0.1", "0.2", "--concurrency", "3", "--out", str(tmp_path / "out")])
    finally:
        server.shutdown()
    assert code == 0
    assert len(FakeOpenAI.seen) == 3 * 3  # (full cache + madakv at 2 budgets) x 3 samples
    xargs = sorted(json.dumps(r["vllm_xargs"], sort_keys=True) for r in FakeOpenAI.seen)
    assert xargs.count('{"kv_eviction": "none"}') == 3
    assert xargs.count('{"kv_eviction": "madakv", "kv_eviction_budget": 0.1}') == 3
    assert all(sum(p["type"] == "image_url" for p in r["messages"][0]["content"]) >= 4 for r in FakeOpenAI.seen)
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and {r["policy"] for r in rows} == {"none", "madakv"}
    with open(tmp_path / "out" / "summary.csv") as f:
        summary = {(r["policy"], r["budget"], r["task"]): float(r["score"]) for r in csv.DictReader(f)}
    assert summary[("none", "", "ALL")] == 1.0
    assert summary[("madakv", "0.1", "SyntheticTextNeedle")] == 0.0
    # memory per setting, from the /metrics difference around it
    with open(tmp_path / "out" / "summary.csv") as f:
        memory = {(r["policy"], r["budget"]): r for r in csv.DictReader(f) if r["task"] == "ALL"}
    assert float(memory[("madakv", "0.1")]["kv_kept"]) == pytest.approx(0.1, abs=1e-3)
    assert float(memory[("madakv", "0.2")]["kv_kept"]) == pytest.approx(0.2, abs=1e-3)
    assert float(memory[("none", "")]["kv_kept"]) == 1.0
    assert float(memory[("madakv", "0.2")]["blocks_freed"]) == 5.0
    assert int(memory[("madakv", "0.2")]["evicted_requests"]) == 3


def _two_sample_sweep(tmp_path):
    """A fake server, the output folder and madakv-eval's arguments for a two-sample text sweep."""
    synthetic.generate(tmp_path / "data", samples=2, seed=0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeOpenAI.seen, FakeOpenAI.counters = [], {}
    out = tmp_path / "out"
    sweep = ["--data", str(tmp_path / "data"), "--tasks", "SyntheticTextNeedle", "--endpoint",
             f"http://127.0.0.1:{server.server_address[1]}/v1", "--policies", "none", "madakv", "--out", str(out)]
    return server, out, sweep


def test_eval_cli_resume_runs_only_the_settings_a_stopped_run_did_not_finish(tmp_path):
    server, out, sweep = _two_sample_sweep(tmp_path)
    try:
        assert cli.main(sweep + ["--budgets", "0.1"]) == 0  # the "stopped" run: two of its three settings
        first = (out / "samples.jsonl").read_text()
        # a setting cut mid-write: a line repeated, one cut short
        (out / "samples.jsonl").write_text(first + first.splitlines()[-1] + "\n" + first.splitlines()[0][:30])
        FakeOpenAI.seen = []
        assert cli.main(sweep + ["--budgets", "0.1", "0.2", "--resume"]) == 0
    finally:
        server.shutdown()
    assert [r["vllm_xargs"] for r in FakeOpenAI.seen] == [{"kv_eviction": "madakv", "kv_eviction_budget": 0.2}] * 2
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted((r["policy"], r["budget"]) for r in rows) == [("madakv", 0.1)] * 2 + [("madakv", 0.2)] * 2 + [
        ("none", None)] * 2
    with open(out / "summary.csv") as f:
        memory = {(r["policy"], r["budget"]): r for r in csv.DictReader(f) if r["task"] == "ALL"}
    # the finished setting's counters come back from memory.json, the new one's from the server
    assert float(memory[("madakv", "0.1")]["kv_kept"]) == pytest.approx(0.1, abs=1e-3)
    assert float(memory[("madakv", "0.2")]["kv_kept"]) == pytest.approx(0.2, abs=1e-3)
    assert memory[("madakv", "0.1")]["samples"] == "2"


def test_eval_cli_resume_stopped_again_keeps_the_finished_settings_on_disk(tmp_path, monkeypatch):
    # a resumed run killed during its first new setting must leave every finished row in place
    server, out, sweep = _two_sample_sweep(tmp_path)
    on_disk = []

    def stopped(self, samples, setting, max_tokens, progress):
        on_disk.append((out / "samples.jsonl").read_text())
        raise KeyboardInterrupt

    try:
        assert cli.main(sweep + ["--budgets", "0.1"]) == 0
        finished = sorted((out / "samples.jsonl").read_text().splitlines())
        monkeypatch.setattr(cli.Endpoint, "run", stopped)
        with pytest.raises(KeyboardInterrupt):
            cli.main(sweep + ["--budgets", "0.1", "0.2", "--resume"])
    finally:
        server.shutdown()
    assert len(finished) == 4 and sorted(on_disk[0].splitlines()) == finished
    assert sorted((out / "samples.jsonl").read_text().splitlines()) == finished


def test_eviction_metrics_parser_sums_modalities():
    page = ('# TYPE vllm:kv_eviction_tokens_kept_total counter\n'
            'vllm:kv_eviction_tokens_kept_total{modality="text"} 10.0\n'
            'vllm:kv_eviction_tokens_kept_total{modality="image"} 5.0\n'
            'vllm:kv_eviction_tokens_kept_created{modality="text"} 1.7e9\n'
            'vllm:num_requests_running{engine="0"} 2.0\n'
            'vllm:kv_eviction_blocks_freed_total 7.0\n')
    values = parse_metrics_page(page)
    assert values == {"kept_text": 10.0, "kept_image": 5.0, "blocks_freed": 7.0}
    assert sum_modalities(values) == {"kept": 15.0, "blocks_freed": 7.0}


def test_eval_cli_says_when_the_endpoint_is_down(tmp_path):
    synthetic.generate(tmp_path / "data", samples=1, seed=0)
    with pytest.raises(SystemExit, match="cannot reach"):
        cli.main(["--data", str(tmp_path / "data"), "--endpoint", "http://127.0.0.1:9/v1", "--out",
                  str(tmp_path / "out")])


def test_eval_cli_runs_an_in_process_engine(tiny_model_dir, tmp_path):
    from prompts import milebench_task

    data = milebench_task(tmp_path / "data")
    milebench_task(data, samples=1, filler_repeats=400, task="TooLong")  # over max_model_len: scored 0
    engine_args = {"dtype": "float32", "enforce_eager": True, "distributed_executor_backend": "uni",
                   "max_model_len": 2048, "block_size": 32, "max_num_seqs": 2, "limit_mm_per_prompt": {"image": 2},
                   "additional_config": {"kv_eviction": {"policy": "madakv", "window": 8}}}
    assert cli.main(["--data", str(data), "--engine", str(tiny_model_dir("qwen2vl")), "--engine-args",
                     json.dumps(engine_args), "--policies", "none", "madakv", "streamingllm", "--budgets", "0.1",
                     "0.3", "--max-tokens", "4", "--out", str(tmp_path / "out")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    too_long = [r for r in rows if r["task"] == "TooLong"]
    assert len(too_long) == 5 and all(r["score"] == 0.0 and "maximum context length" in r["error"] for r in too_long)
    rows = [r for r in rows if r["task"] == "LongCaptions"]
    assert len(rows) == 2 * 5 and all(r["prompt_tokens"] > 500 and "error" not in r for r in rows)
    by_setting = {}
    for r in rows:
        by_setting.setdefault((r["policy"], r["budget"]), []).append(r["prediction"])
    assert len({tuple(p) for p in by_setting.values()}) > 1, "eviction should change some answers"
    with open(tmp_path / "out" / "summary.csv") as f:
        memory = {(r["policy"], r["budget"]): r for r in csv.DictReader(f) if r["task"] == "ALL"}
    for policy in ("madakv", "streamingllm"):
        for budget in (0.1, 0.3):
            assert float(memory[(policy, str(budget))]["kv_kept"]) == pytest.approx(budget, abs=0.01)
            assert int(memory[(policy, str(budget))]["evicted_requests"]) == 2  # not the rejected one
    assert float(memory[("madakv", "0.1")]["blocks_freed"]) > float(memory[("madakv", "0.3")]["blocks_freed"]) > 0


def test_eval_cli_bad_engine_args_fail_with_one_line(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    synthetic.generate(data, samples=1, seed=0)
    with pytest.raises(SystemExit, match="cannot start an engine on .*no_such_arg"):
        cli.main(["--data", str(data), "--engine", str(tiny_model_dir("qwen2vl")), "--engine-args",
                  '{"no_such_arg": 1}', "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit):  # argparse: not a JSON object
        cli.main(["--data", str(data), "--engine", "m", "--engine-args", "[1]", "--out", str(tmp_path / "out")])


def test_score_intervals_wilson_for_exact_match_bootstrap_otherwise():
    from madakv_vllm.evaluation.report import interval

    low, high = interval([1.0] * 80 + [0.0] * 20)  # Wilson, 80/100: the textbook 0.711 .. 0.867
    assert (round(low, 3), round(high, 3)) == (0.711, 0.867)
    assert interval([1.0] * 10) == (pytest.approx(0.722, abs=1e-3), pytest.approx(1.0))  # never past 1 at 10/10
    fractional = [0.2, 0.9, 0.55, 0.7, 0.35, 0.8, 0.6, 0.4]
    low, high = interval(fractional)
    mean = sum(fractional) / len(fractional)
    assert low < mean < high and 0.1 < high - low < 0.5 and interval(fractional) == (low, high)  # seeded
    small, large = interval([1.0, 0.0] * 5), interval([1.0, 0.0] * 500)
    assert (small[1] - small[0]) > 5 * (large[1] - large[0])  # ~1/sqrt(n)


def test_eval_cli_writes_intervals_and_accuracy_json(tmp_path):
    synthetic.generate(tmp_path / "data", samples=2, seed=0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeOpenAI.seen, FakeOpenAI.counters, FakeOpenAI.resets = [], {}, 0
    try:
        assert cli.main(["--data", str(tmp_path / "data"), "--endpoint", f"http://127.0.0.1:{server.server_address[1]}/v1",
                         "--policies", "none", "madakv", "--budgets", "0.2", "--max-tokens", "4",
                         "--out", str(tmp_path / "out")]) == 0
    finally:
        server.shutdown()
    assert FakeOpenAI.resets == 2  # before each of the two settings
    with open(tmp_path / "out" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(float(r["ci_low"]) <= float(r["score"]) <= float(r["ci_high"]) for r in rows)
    results = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert {tuple(sorted(r)) for r in results} == {("budget", "ci_high", "ci_low", "kv_kept", "n", "policy", "score",
                                                    "setting", "task")}
    assert {r["policy"] for r in results} == {"none", "madakv"} and all(r["setting"] == "endpoint" for r in results)
    assert {r["prefix_cache"] for r in rows if r["task"] == "ALL"} == {"reset"}


def test_paired_p_is_the_exact_mcnemar_test():
    """Only discordant samples count: 8 wins and 0 losses out of 100 shared samples is
    p = 2 / 2**8; equal wins and losses, or no discordant sample, is p = 1."""
    from madakv_vllm.evaluation.report import paired_comparison, paired_p

    first = {i: 1.0 for i in range(100)}
    second = {i: float(i >= 8) for i in range(100)}
    assert paired_comparison(first, second) == pytest.approx((0.08, 8, 0, 2 / 2 ** 8))
    # only the samples both ran count: the first's extra sample changes nothing
    assert paired_comparison({**first, 100: 0.0}, second) == pytest.approx((0.08, 8, 0, 2 / 2 ** 8))
    assert paired_p(first, second) == pytest.approx(2 / 2 ** 8)
    assert paired_p(second, first) == pytest.approx(2 / 2 ** 8)
    assert paired_p(first, first) == 1.0
    swapped = {i: float(i not in (0, 1)) for i in range(100)} | {100: 1.0, 101: 1.0}
    assert paired_p({**first, 100: 0.0, 101: 0.0}, swapped) == 1.0
