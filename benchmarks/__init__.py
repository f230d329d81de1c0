"""Reproducible benchmarks (``make bench``); each one runs as ``python -m benchmarks.<name>``.

  harness              what they share: arguments, timing, environment facts, JSON, tables
  prefill              one prefill forward: ours against the official ``recurrentgemma``
  engine_vs_reference  our Engine against the official Sampler and HF generate (parts in engine/)
  pipeline_efficiency  end-to-end pipeline tokens/s over engine-only tokens/s
  pipeline_scale       the driver's memory and reads at two corpus sizes; rows/s per stage
  controls             generation controls: n=4 prefills once, tokens wasted past a stop,
                       greedy rows unchanged beside rows with controls, their cost
  prefix_reuse         many questions per document: prefilled tokens and rows/s with and without
                       reusing the document's state
  grammar              structured output: JSON-schema-constrained rows/s against plain rows/s
  grammar_libraries    xgrammar, llguidance and outlines-core at a 256k vocabulary
  gpu_engine           the Engine at full size on one accelerator, against the roofline
  gpu_reference        the same 2B workload through the official Sampler and HF generate
  gpu_numerics         bf16 logits against float32 on a short batch
  gpu_report           the summary of a gpu_all.sh run (gpu_all.sh runs every GPU part)

Kept free of imports, so that a subprocess started on a module here loads only what it uses.
"""
