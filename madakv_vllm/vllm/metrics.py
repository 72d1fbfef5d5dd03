"""Eviction counters, from the engine core and its workers to Prometheus in the API server.

vLLM exports `/metrics` from the API server process only, while eviction happens in the engine
core (scheduler) and the workers. Each of those processes publishes its cumulative counters as
a small JSON file in a directory the API server chose at start-up (env MADAKV_METRICS_DIR,
inherited by the processes it spawns); the API server's stat logger (`vllm.stat_logger_plugins`)
sums the files at every stats tick and advances the Prometheus counters by the difference.
"""
from __future__ import annotations

import atexit
import itertools
import json
import os
import threading
import weakref
from collections import defaultdict
from pathlib import Path

from madakv_kernels import MODALITY_TAGS

ENV_DIR = "MADAKV_METRICS_DIR"
# Prometheus names (counters are exported with a "_total" suffix). The same short keys name the
# published counters ("requests", "blocks_freed", "kept_<modality>", "evicted_<modality>",
# "layer_kept_<layer index>").
METRIC_REQUESTS = "vllm:kv_eviction_requests"
METRIC_KEPT = "vllm:kv_eviction_tokens_kept"
METRIC_EVICTED = "vllm:kv_eviction_tokens_evicted"
METRIC_LAYER_KEPT = "vllm:kv_eviction_layer_tokens_kept"
METRIC_BLOCKS_FREED = "vllm:kv_eviction_blocks_freed"
METRIC_SECONDS = "vllm:kv_eviction_seconds"
METRIC_DECODE_COMPACTIONS = "vllm:kv_eviction_decode_compactions"
METRIC_DECODE_SECONDS = "vllm:kv_eviction_decode_seconds"
MAX_RECENT = 1000  # observations kept for a reader that fell behind
SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0)


class Counters:
    """Cumulative counters of one engine's scheduler or worker, published to
    `<dir>/<name>-<pid>-<serial>.json` when they change. The folder is the engine's, read when
    the counters are made; the serial keeps two engines of one process (or a leftover one) out of
    each other's file. The file is written by a background thread: publish() only wakes it, so
    the scheduler's and workers' steps never wait on the disk."""

    in_this_process: "weakref.WeakSet[Counters]" = weakref.WeakSet()
    _serials = itertools.count()

    def __init__(self, name: str):
        self.name = name
        self.directory = os.environ.get(ENV_DIR)  # None: nothing is published
        self.serial = next(Counters._serials)
        Counters.in_this_process.add(self)
        self.values: dict[str, float] = defaultdict(float)
        self.seconds: list[float] = []  # recent observations, one per request (scoring + compaction)
        self.seconds_count = 0
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # the writer thread and the exit flush
        self._changed = threading.Event()
        self._writer_pid: int | None = None  # a thread does not survive fork: restarted in a child

    def add(self, **amounts: float) -> None:
        with self._lock:
            for key, amount in amounts.items():
                self.values[key] += amount

    def add_layer_kept(self, kept_per_layer: list[int]) -> None:
        """Prompt tokens each KV head of each layer kept for one request (the per-layer shape)."""
        self.add(**{f"layer_kept_{layer}": kept for layer, kept in enumerate(kept_per_layer)})

    def observe_seconds(self, seconds: float) -> None:
        with self._lock:
            self.seconds = self.seconds[-(MAX_RECENT - 1):] + [seconds]
            self.seconds_count += 1

    def publish(self) -> None:
        """Have the current counters written soon (coalesced: one write for several calls)."""
        if not self.directory:
            return
        if self._writer_pid != os.getpid():
            self._writer_pid = os.getpid()
            threading.Thread(target=self._write_when_changed, name=f"madakv-metrics-{self.name}",
                             daemon=True).start()
            atexit.register(self.write)  # a daemon thread may not get to the last change
        self._changed.set()

    def _write_when_changed(self) -> None:
        while True:
            self._changed.wait()
            self._changed.clear()
            try:
                self.write()
            except OSError:  # e.g. the folder was removed at shutdown; the next change retries
                pass

    def write(self) -> None:
        """Write the counters now (the background thread's job; tests and exit call it too)."""
        if not self.directory:
            return
        path = Path(self.directory) / f"{self.name}-{os.getpid()}-{self.serial}.json"
        tmp = path.with_suffix(".tmp")
        with self._write_lock:  # snapshot inside: a later write never carries older values
            with self._lock:
                payload = {"values": dict(self.values), "seconds": list(self.seconds),
                           "seconds_count": self.seconds_count}
            tmp.write_text(json.dumps(payload))
            tmp.replace(path)  # readers never see half a file


def write_all_in_this_process() -> None:
    """Write every counter this process holds now (an in-process engine's reader, which must not
    race the background writers)."""
    for counters in list(Counters.in_this_process):
        try:
            counters.write()
        except OSError:  # an earlier engine's folder, removed since
            pass


def read_totals(directory: str) -> tuple[dict[str, float], dict[str, tuple[int, list[float]]]]:
    """Summed counters of all publishers, and each publisher's (observation count, recent ones)."""
    values: dict[str, float] = defaultdict(float)
    seconds: dict[str, tuple[int, list[float]]] = {}
    for path in Path(directory).glob("*.json"):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced; next tick
        for key, amount in payload.get("values", {}).items():
            values[key] += amount
        seconds[path.name] = (payload.get("seconds_count", 0), payload.get("seconds", []))
    return values, seconds


def parse_metrics_page(text: str) -> dict[str, float]:
    """Our counters from a Prometheus text page (the server's /metrics), by short key:
    requests, blocks_freed, kept_<modality>, evicted_<modality>, layer_kept_<layer>, seconds_sum,
    seconds_count."""
    names = {f"{METRIC_REQUESTS}_total": "requests", f"{METRIC_BLOCKS_FREED}_total": "blocks_freed",
             f"{METRIC_KEPT}_total": "kept_", f"{METRIC_EVICTED}_total": "evicted_",
             f"{METRIC_LAYER_KEPT}_total": "layer_kept_",
             f"{METRIC_SECONDS}_sum": "seconds_sum", f"{METRIC_SECONDS}_count": "seconds_count"}
    values: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        name, _, labels = series.partition("{")
        if name not in names:
            continue
        key = names[name]
        if key.endswith("_"):
            label = "layer" if key == "layer_kept_" else "modality"
            key += labels.split(f'{label}="', 1)[1].split('"', 1)[0] if f'{label}="' in labels else "unknown"
        values[key] += float(value)
    return dict(values)


def sum_modalities(values: dict[str, float]) -> dict[str, float]:
    """Counters with the modalities summed: requests, blocks_freed, kept, evicted."""
    totals: dict[str, float] = defaultdict(float)
    for key, value in values.items():
        if key.startswith(("kept_", "evicted_")):
            totals[key.split("_", 1)[0]] += value
        elif key in ("requests", "blocks_freed"):
            totals[key] += value
    return dict(totals)


def _make_stat_logger_class():
    from vllm.v1.metrics.loggers import StatLoggerBase

    class EvictionStatLogger(StatLoggerBase):
        """Prometheus counters for KV eviction (no-op when eviction is off)."""

        def __init__(self, vllm_config, engine_index: int = 0):
            from .requests import engine_config

            self.directory = os.environ.get(ENV_DIR)
            self.enabled = engine_index == 0 and bool(self.directory) and \
                engine_config(vllm_config.additional_config) is not None
            self.created = False

        def _create_metrics(self):
            # Not in __init__: vLLM's own Prometheus logger is built after plugin loggers and
            # unregisters every "vllm:" collector it finds.
            from prometheus_client import Counter, Histogram
            from vllm.v1.metrics.prometheus import get_prometheus_registry

            registry = get_prometheus_registry()
            self.requests = Counter(METRIC_REQUESTS, "Requests whose KV cache was evicted", registry=registry)
            self.kept = Counter(METRIC_KEPT, "Prompt tokens kept (per KV head and layer)", ["modality"],
                                registry=registry)
            self.evicted = Counter(METRIC_EVICTED, "Prompt tokens evicted (per KV head and layer)", ["modality"],
                                   registry=registry)
            self.layer_kept = Counter(METRIC_LAYER_KEPT, "Prompt tokens kept per KV head, by layer", ["layer"],
                                      registry=registry)
            self.blocks = Counter(METRIC_BLOCKS_FREED, "KV-cache blocks returned to the pool", registry=registry)
            self.seconds = Histogram(METRIC_SECONDS, "Scoring + compaction time per request",
                                     buckets=SECONDS_BUCKETS, registry=registry)
            self.decode_compactions = Counter(METRIC_DECODE_COMPACTIONS, "Compactions during decode (the output's)",
                                              registry=registry)
            self.decode_seconds = Counter(METRIC_DECODE_SECONDS, "Scoring + compaction time of compactions during "
                                          "decode", registry=registry)
            for modality in MODALITY_TAGS:  # export zeros from the start
                self.kept.labels(modality=modality)
                self.evicted.labels(modality=modality)
            self.seen: dict[str, float] = defaultdict(float)
            self.seen_seconds: dict[str, int] = defaultdict(int)
            self.created = True

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if not self.enabled:
                return
            if not self.created:
                self._create_metrics()
            values, seconds = read_totals(self.directory)
            for key, total in values.items():
                delta = total - self.seen[key]
                if delta <= 0:
                    continue
                self.seen[key] = total
                if key == "requests":
                    self.requests.inc(delta)
                elif key == "blocks_freed":
                    self.blocks.inc(delta)
                elif key == "decode_compactions":
                    self.decode_compactions.inc(delta)
                elif key == "decode_seconds":
                    self.decode_seconds.inc(delta)
                elif key.startswith("layer_kept_"):
                    self.layer_kept.labels(layer=key[len("layer_kept_"):]).inc(delta)
                elif key.startswith("kept_"):
                    self.kept.labels(modality=key[5:]).inc(delta)
                elif key.startswith("evicted_"):
                    self.evicted.labels(modality=key[8:]).inc(delta)
            for publisher, (count, recent) in seconds.items():
                new = count - self.seen_seconds[publisher]
                for value in recent[len(recent) - min(new, len(recent)):] if new > 0 else ():
                    self.seconds.observe(value)
                self.seen_seconds[publisher] = count

        def log_engine_initialized(self):
            pass

    return EvictionStatLogger


def __getattr__(name):  # the entry point resolves this lazily: vLLM is imported only when asked
    if name == "EvictionStatLogger":
        cls = _make_stat_logger_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
