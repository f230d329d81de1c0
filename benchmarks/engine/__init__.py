"""The parts of the engine benchmark (``python -m benchmarks.engine_vs_reference``), by what each
measures:

  workload    the requests every part runs (seeded prompt lengths, budgets and ids) and padding
  ours        our Engine, per engine setting: cold and warm, with a per-call time breakdown
  references  the official recurrentgemma Sampler and HF transformers generate, cold and warm
  ceiling     the workload's matmul FLOPs at the rates XLA reaches here: an upper bound
  memory      peak memory of a short and a long generation, each in a fresh subprocess
  compare     greedy-token agreement between the implementations and the throughput ratios
  report      the printed report
"""
