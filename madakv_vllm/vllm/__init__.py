"""The vLLM 0.32 seam: the only package that knows vLLM internals.

request -> scheduler (`scheduler.py`: window kept in one prefill chunk, compaction plan one step
after prefill with headroom for the step, physical block accounting, deferred frees) -> worker
(`runner.py`: window queries scored per layer, policy selection, `madakv_kernels.compact_kv`
into the plan's blocks, physical seq_lens and slots) -> freed blocks back to vLLM's pool.

`plugin.py` is the entry point (CLI flags, request validation, hook installation); `compat.py`
the version gate and start-up refusals; `protocol.py` the one scheduler -> worker message;
`requests.py` what both sides compute from a request; `kv_layout.py` where each backend keeps
keys and values; `metrics.py` the counters and their Prometheus names. No module imports one
that imports it back.
"""
