"""Reproducible benchmarks (``make bench``); each one runs as ``python -m benchmarks.<name>``.

  harness              what they share: arguments, timing, environment facts, JSON, tables
  prefill              one prefill forward: ours against the official ``recurrentgemma``
  engine_vs_reference  our Engine against the official Sampler and HF generate (parts in engine/)
  pipeline_efficiency  end-to-end pipeline tokens/s over engine-only tokens/s
  gpu_engine           the Engine at full size on one accelerator, against the roofline

Kept free of imports, so that a subprocess started on a module here loads only what it uses.
"""
