"""The printed report of the engine benchmark: one section per part that ran."""

from __future__ import annotations

from typing import Any

from benchmarks import harness


def _mismatch_summary(first: dict[int, int]) -> str:
    if not first:
        return ""
    shown = ", ".join(f"#{i}@{k}" for i, k in list(first.items())[:8])
    more = f", ... ({len(first) - 8} more)" if len(first) > 8 else ""
    return f"; request#@first differing token: {shown}{more}"


def _mb(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


def _header(results: dict[str, Any]) -> list[str]:
    env, wl = results["environment"], results["workload"]
    return [
        harness.environment_line(env, devices=False),
        f"model: {harness.model_summary(wl)}, float32, {wl['params']:,} params",
        f"workload: {wl['requests']} requests, prompts {wl['min_prompt']}..{wl['max_prompt']} "
        f"({wl['prompt_tokens']:,} tokens), max_new {wl['min_new']}..{wl['max_new']}, no early "
        f"stop; useful tokens = sum(max_new) = {wl['useful_tokens']:,}; ours {wl['slots']} slots, "
        f"references in batches of {wl['ref_batch']}",
        harness.load_line(env),
        "",
    ]


def _table(results: dict[str, Any]) -> list[str]:
    lines = harness.with_rule(
        f"{'implementation':<26}{'cold s':>9}{'cold tok/s':>12}{'warm s':>9}{'warm tok/s':>12}"
        f"{'cold/warm':>11}{'executables':>13}"
    )
    rows = [*results.get("ours", []), *(results[k] for k in ("official", "hf") if k in results)]
    for row in rows:
        if "warm_s" not in row:
            lines.append(f"{row['label']:<26}FAILED: {row.get('error')}")
            continue
        shapes = row.get("compiled_shapes_after_warm")
        shapes_text = "" if shapes is None else f"{row['compiled_shapes_after_cold']}->{shapes}"
        if row["cold_s"] is None:
            cold_text = f"{'-':>9}{'-':>12}"
            ratio_text = f"{'-':>11}"
        else:
            cold_text = f"{row['cold_s']:>9.2f}{row['cold_tokens_per_s']:>12,.0f}"
            ratio_text = f"{row['cold_tokens_per_s'] / row['warm_tokens_per_s']:>11.2f}"
        lines.append(
            f"{row['label']:<26}{cold_text}{row['warm_s']:>9.2f}"
            f"{row['warm_tokens_per_s']:>12,.0f}{ratio_text}{shapes_text:>13}"
        )
    lines.append("")
    return lines


def _work(results: dict[str, Any]) -> list[str]:
    """Where each implementation's time and padded work went."""
    lines = []
    if results.get("ours"):
        lines.append(
            "ours: pb/c/ds = prefill_batch/prefill_chunk/decode_steps; cold = new Engine + "
            "compile + generate, warm = same engine again (defaults: after engine.warmup(), "
            "not timed cold); executables = jitted shapes held after cold -> after warm"
        )
        lines.append("ours warm-run breakdown (block_until_ready per jitted call):")
        useful = results["workload"]["useful_tokens"]
        for row in results["ours"]:
            b = row["breakdown"]
            lines.append(
                f"  {row['label']:<24} prefill {b['prefill_s']:6.2f}s ({b['prefill_calls']} calls, "
                f"{b['prompt_tokens'] / b['prefill_token_slots']:.0%} of "
                f"{b['prefill_token_slots']:,} token slots real)  insert {b['insert_s']:5.2f}s  "
                f"decode {b['decode_s']:6.2f}s ({b['decode_calls']} calls, "
                f"{useful / b['decode_slot_steps']:.0%} of "
                f"{b['decode_slot_steps']:,} slot-steps useful)  host {b['host_s']:5.2f}s"
            )
    for key in ("official", "hf"):
        if key in results and "computed_token_slots" in results[key]:
            row = results[key]
            threads = f", torch threads {row['torch_threads']}" if "torch_threads" in row else ""
            lines.append(
                f"{row['label']}: {row['batches']} batches, computed {row['computed_token_slots']:,}"
                f" token slots for {row['useful_tokens']:,} useful "
                f"({row['useful_tokens'] / row['computed_token_slots']:.0%}){threads}"
            )
    if "called" in results.get("official", {}):
        lines.append(f"official calls: {results['official']['called']}")
    lines.append("")
    return lines


def _ceiling_and_ratios(results: dict[str, Any]) -> list[str]:
    lines = []
    roof = results.get("ceiling")
    if roof:
        lines.append(
            f"ceiling (matmul FLOPs only, at the float32 rates XLA reaches here): decode rows "
            f"{roof['decode_rows']} {roof['decode_gflops']:.0f} GFLOP/s, prefill rows "
            f"{roof['prefill_rows']} {roof['prefill_gflops']:.0f} GFLOP/s -> at least "
            f"{roof['min_decode_s']:.1f}s decode + {roof['min_prefill_s']:.1f}s prefill = "
            f"{roof['ceiling_tokens_per_s']:,.0f} useful tok/s at most"
        )
        lines.append("")
    ratios = results.get("ratios", {})
    if ratios:
        lines.append("ratios (useful tokens/s):")
        for name, value in ratios.items():
            lines.append(f"  {name:<44}{value:8.2f}")
        lines.append("")
    for name, cmp in results.get("token_checks", {}).items():
        lines.append(
            f"greedy tokens {name}: {cmp['identical']}/{cmp['compared']} requests identical"
            + _mismatch_summary(cmp["first_mismatch_at"])
        )
    return lines


def _memory(mem: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"memory: cache_bytes_per_sequence(float32) {mem['cache_bytes_per_sequence']:,} B; "
        f"engine device state per slot {mem['engine_state_bytes_per_slot']:,} B "
        f"({mem['engine_state_bytes_total']:,} B for {mem['engine_slots']} slots)",
    ]
    if "error" in mem:
        lines.append(f"memory runs FAILED: {mem['error']}")
        return lines
    opts = mem["options"] or "engine defaults"
    lines.append(f"  fresh subprocess per run, engine settings {opts}:")
    for key in ("short", "long"):
        r = mem[key]
        lines.append(
            f"  {r['requests']} x (prompt {r['prompt']}, max_new {r['max_new']:>5}) on "
            f"{r['slots']} slots: peak during generate {_mb(r['peak_during_generate'])} "
            f"(+{_mb(r['growth_during_generate'])} over the RSS before it), process peak "
            f"{_mb(r['process_peak'])}; {r['generated_tokens']:,} tokens in "
            f"{r['seconds']:.1f}s = {r['tokens_per_s']:,.0f} tok/s"
        )
    lines.append(
        f"  long - short: peak during generate {_mb(mem['peak_during_generate_diff'])}, "
        f"process peak {_mb(mem['process_peak_diff'])}, growth during generate "
        f"{_mb(mem['growth_diff'])}; the extra output ids as Python ints "
        f"~{_mb(mem['output_buffer_bytes_estimate'])} (peaks: {mem['short']['peak_source']})"
    )
    lines.append(
        f"  (for scale: a KV cache keeping every token would need "
        f"{_mb(mem['unbounded_kv_cache_bytes_estimate'])} more for the long run; "
        f"children run with {' '.join(f'{k}={v}' for k, v in mem['malloc_env'].items())})"
    )
    return lines


def format_report(results: dict[str, Any]) -> str:
    lines = [*_header(results), *_table(results), *_work(results)]
    lines += _ceiling_and_ratios(results)
    if results.get("memory"):
        lines += _memory(results["memory"])
    lines.append(f"total wall time {results['wall_s']:.0f}s")
    return "\n".join(lines)
