"""The vLLM 0.32 seam: the only package that knows vLLM internals.

request -> scheduler (`scheduler.py`: window kept in one prefill chunk, compaction plan one step
after prefill, physical block accounting, deferred frees) -> worker (`runner.py`: window
queries scored per layer, policy selection, `madakv_kernels.compact_kv` into the plan's blocks,
physical seq_lens and slots) -> freed blocks back to vLLM's pool.
`plugin.py` is the entry point: version gate, CLI flags, start-up checks.
"""
