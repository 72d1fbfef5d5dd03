"""Where madakv-eval sends its samples: an OpenAI-compatible endpoint or an in-process vLLM
engine. Both answer a batch of samples for one setting and report the eviction counters."""
from __future__ import annotations

import base64
import mimetypes
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from ..vllm.metrics import ENV_DIR, parse_metrics_page, read_totals, sum_modalities, write_all_in_this_process
from ..vllm.requests import CONFIG_KEY, XARG_BUDGET, XARG_POLICY
from .milebench import Sample, scorer_for


@dataclass(frozen=True)
class Setting:
    policy: str
    budget: float | None  # None: the server's own budget (or no eviction for "none")

    @property
    def xargs(self) -> dict:
        args = {XARG_POLICY: self.policy}
        if self.budget is not None and self.policy != "none":
            args[XARG_BUDGET] = self.budget
        return args

    @property
    def label(self) -> str:
        return "full cache" if self.policy == "none" else f"{self.policy}@{self.budget}"


def settings(policies: list[str], budgets: list[float]) -> list[Setting]:
    out = [Setting("none", None)] if "none" in policies else []
    out += [Setting(p, b) for p in policies if p != "none" for b in budgets]
    return out


def image_part(path: Path) -> dict:
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    data = base64.b64encode(path.read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def messages(sample: Sample) -> list[dict]:
    content = [{"type": "text", "text": value} if kind == "text" else image_part(value)
               for kind, value in sample.parts()]
    return [{"role": "user", "content": content}]


def _scored(row: dict, sample: Sample, prediction: str, prompt_tokens: int | None, started: float) -> dict:
    return dict(row, prediction=prediction, score=scorer_for(sample)(prediction, sample.answer, sample.choices),
                prompt_tokens=prompt_tokens, latency_s=time.perf_counter() - started)


def _row(sample: Sample, setting: Setting) -> dict:
    return dict(task=sample.task, sample_id=sample.sample_id, policy=setting.policy, budget=setting.budget,
                answer=sample.answer)


class Endpoint:
    """An OpenAI-compatible server; a request it rejects (e.g. too long) scores 0 with its error."""

    def __init__(self, url: str, model: str | None, concurrency: int):
        import openai

        self.url, self.concurrency = url.rstrip("/"), concurrency
        self.root = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url  # /metrics etc.
        # a server started with --api-key (the deploy manifests always are) needs it on every request
        api_key = os.environ.get("VLLM_API_KEY") or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.client = openai.OpenAI(base_url=self.url, api_key=api_key)
        try:
            self.model = model or self.client.models.list().data[0].id
        except openai.APIConnectionError:
            sys.exit(f"madakv-eval: cannot reach {url}; start `vllm serve MODEL --kv-eviction madakv` first")

    def ask(self, sample: Sample, setting: Setting, max_tokens: int) -> dict:
        import openai

        started, row = time.perf_counter(), _row(sample, setting)
        try:
            reply = self.client.chat.completions.create(
                model=self.model, messages=messages(sample), max_tokens=max_tokens, temperature=0,
                extra_body={"vllm_xargs": setting.xargs})
        except openai.APIStatusError as exc:
            return dict(row, prediction="", score=0.0, error=f"HTTP {exc.status_code}: {exc.message}",
                        latency_s=time.perf_counter() - started)
        return _scored(row, sample, reply.choices[0].message.content or "",
                       reply.usage.prompt_tokens if reply.usage else None, started)

    def run(self, samples: list[Sample], setting: Setting, max_tokens: int, progress) -> list[dict]:
        rows = []
        with ThreadPoolExecutor(self.concurrency) as pool:
            for future in as_completed([pool.submit(self.ask, s, setting, max_tokens) for s in samples]):
                rows.append(future.result())
                progress.update()
        return rows

    def reset_prefix_cache(self) -> bool:
        """Empty the server's prefix cache, so no setting reuses an earlier one's prompt blocks.
        vLLM serves POST /reset_prefix_cache only with VLLM_SERVER_DEV_MODE=1; False otherwise."""
        import urllib.error
        import urllib.request

        try:
            request = urllib.request.Request(f"{self.root}/reset_prefix_cache", method="POST",
                                             headers={"Authorization": f"Bearer {self.client.api_key}"})
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status == 200
        except OSError:  # HTTPError included (404 outside dev mode)
            return False

    def eviction_totals(self) -> dict[str, float] | None:
        """The server's eviction counters ({} before its first stats tick, or when it is not our
        plugin), or None when it has no /metrics."""
        import urllib.error
        import urllib.request

        for attempt in range(3):  # a busy server can be slow to answer
            try:
                with urllib.request.urlopen(f"{self.root}/metrics", timeout=60) as response:
                    return sum_modalities(parse_metrics_page(response.read().decode()))
            except urllib.error.HTTPError:
                return None  # it answers, but has no /metrics
            except OSError:
                time.sleep(1 + attempt)
        return None

    def close(self):
        pass


class Engine:
    """An in-process vLLM engine (`vllm.LLM`) with eviction on; requests pick their setting."""

    def __init__(self, model: str, engine_args: dict):
        from vllm import LLM
        from vllm.exceptions import VLLMClientError

        self.rejected = (ValueError, VLLMClientError)  # what the server would answer with a 4xx

        args = dict(engine_args)
        args.setdefault("additional_config", {}).setdefault(CONFIG_KEY, {"policy": "madakv"})
        try:
            self.llm = LLM(model=model, **args)
        except (TypeError, ValueError) as exc:  # a bad --engine-args key or value
            sys.exit(f"madakv-eval: cannot start an engine on {model}: {' '.join(str(exc).split())}")
        self.metrics_dir = os.environ[ENV_DIR]  # the plugin made a fresh one for this engine

    def run(self, samples: list[Sample], setting: Setting, max_tokens: int, progress) -> list[dict]:
        from vllm import SamplingParams

        started = time.perf_counter()
        params = SamplingParams(temperature=0, max_tokens=max_tokens, extra_args=setting.xargs)
        try:
            outputs = self.llm.chat([messages(s) for s in samples], params, use_tqdm=False)
        except self.rejected:  # a sample is rejected (e.g. too long): run them one by one
            if len(samples) == 1:
                raise
            return [row for s in samples for row in self._run_one(s, setting, max_tokens, progress)]
        rows = []
        for sample, out in zip(samples, outputs):
            rows.append(_scored(_row(sample, setting), sample, out.outputs[0].text, len(out.prompt_token_ids),
                                started))
            progress.update()
        return rows

    def _run_one(self, sample: Sample, setting: Setting, max_tokens: int, progress) -> list[dict]:
        try:
            return self.run([sample], setting, max_tokens, progress)
        except self.rejected as exc:  # scored 0 with its error, as the endpoint does with an HTTP 400
            progress.update()
            return [dict(_row(sample, setting), prediction="", score=0.0, error=" ".join(str(exc).split()))]

    def reset_prefix_cache(self) -> bool:
        return self.llm.reset_prefix_cache()

    def eviction_totals(self) -> dict[str, float] | None:
        # the counters reach their files from a background writer a moment after the step that
        # changed them: write those of an engine core in this process now, and read until two
        # reads a short pause apart agree (an engine core in a child process)
        write_all_in_this_process()
        values, _ = read_totals(self.metrics_dir)
        for _ in range(50):
            time.sleep(0.1)
            again, _ = read_totals(self.metrics_dir)
            if again == values:
                break
            values = again
        return sum_modalities(values)

    def close(self):
        self.llm.llm_engine.engine_core.shutdown()
