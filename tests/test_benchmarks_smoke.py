"""`benchmarks/switch_latency.py --quick` runs end to end and writes results of the documented shape; so do
`serving.py --quick` and `soak.py --quick` against a live `alora serve`.

No timing is asserted (timings belong to the benchmark, on a quiet machine); the counts, token bookkeeping and
greedy agreement with transformers + PEFT are.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"alora_invoke", "lora_invoke", "merge_swap", "peft_alora", "peft_lora", "base_floor"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "switch_latency_quick.json"
    # one thread: on a machine whose cores are busy (a parallel test run) more threads only contend; llama.cpp
    # (present where `make peers` ran) is left out: these are our columns
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "switch_latency.py"), "--quick",
                           "--threads", "1", "--skip-llamacpp", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), out, proc.stdout


def test_header_names_machine_versions_and_model(quick):
    result, _, _ = quick
    assert result["benchmark"] == "switch_latency" and result["quick"] is True
    assert result["machine"]["cpu"] and result["machine"]["torch_threads"] == 1
    assert set(result["versions"]) >= {"torch", "transformers", "peft", "alora"}
    assert result["cpu_guard"]["retries"] == 0 and result["cpu_guard"]["samples"] > 0
    assert result["model"]["layers"] > 0 and result["model"]["context"] > max(result["config"]["lengths"])


def test_sweep_has_every_method_at_every_length(quick):
    result, _, stdout = quick
    cfg, sweep = result["config"], result["sweep"]
    n = cfg["new_tokens"]
    assert [p["L"] for p in sweep["points"]] == cfg["lengths"]
    for p in sweep["points"]:
        L = p["L"]
        assert set(p["methods"]) == METHODS
        for m, data in p["methods"].items():
            assert len(data["runs"]) == cfg["runs"]
            for run in data["runs"]:
                assert run["tokens"] == n, (m, run)
                assert 0 < run["ttft_s"] <= run["total_s"]
                assert run["other_cpu_cores"] >= 0 and run["rejected"] == 0  # --quick records, never repeats
            assert data["median_ttft_s"] <= data["median_total_s"]
        alora, lora = p["methods"]["alora_invoke"]["runs"], p["methods"]["lora_invoke"]["runs"]
        assert all(r["reused_tokens"] == L and r["recomputed_tokens"] == 0 for r in alora)
        assert all(r["prefill_tokens"] == p["invocation_tokens"] for r in alora)
        assert all(r["reused_tokens"] == 0 and r["recomputed_tokens"] == L for r in lora)
        for kind in ("ttft", "total"):
            assert set(p["ratios"][kind]) == {"lora/alora", "merge_swap/alora", "peer/ours alora",
                                              "peer/ours lora", "alora/base_floor"}
            assert all(v > 0 for v in p["ratios"][kind].values())
        # same greedy tokens as PEFT's own aLoRA and LoRA paths, and merging the LoRA into the weights (read by
        # the engine's adapter parser) gives what running it as an adapter gives
        assert p["outputs_agree"]["alora_invoke==peft_alora"] and p["outputs_agree"]["lora_invoke==peft_lora"]
        assert p["outputs_agree"]["merge_swap==lora_invoke"]
        assert p["cache_bytes"] == p["peer_cache_bytes"] > 0
    assert "Switch latency" in stdout


def test_scaling_chat_and_memory_sections(quick):
    result, _, _ = quick
    k = result["config"]["scaling_k"]
    sc = result["scaling"]
    for kind in ("alora", "lora"):
        assert len(sc[kind]["per_adapter_s"]) == len(sc[kind]["cumulative_s"]) == k
        assert sc[kind]["cumulative_s"] == sorted(sc[kind]["cumulative_s"])
    chat = result["chat"]
    for kind in ("alora", "lora"):
        turns = chat[kind]["turns"]
        assert len(turns) == chat["turns"]
        assert [len(t["invokes"]) for t in turns] == [1 + i % 3 for i in range(chat["turns"])]
        assert all(b["history_tokens"] > a["history_tokens"] for a, b in zip(turns, turns[1:]))
        assert chat[kind]["total_s"] >= sum(t["turn_s"] for t in turns) * 0.99
    # the two runs see the same conversation: base replies are greedy and adapters never change the history
    assert [t["history_tokens"] for t in chat["alora"]["turns"]] == [t["history_tokens"] for t in chat["lora"]["turns"]]
    for row in result["memory"]["rows"]:
        one = row["alora_one_base_cache_bytes"]
        assert one > 0 and row["cache_per_adapter_bytes"] == {str(j): (1 + j) * one for j in range(1, k + 1)}


def test_plots_written_next_to_the_json(quick):
    _, out, _ = quick
    for path in (out.with_suffix(".png"), out.with_name(out.stem + "_chat.png"),
                 out.with_name(out.stem + "_scaling.png")):
        assert path.stat().st_size > 10_000, path


# ---- serving.py and soak.py through a live `alora serve` -------------------------------------------------------

sys.path.insert(0, str(ROOT / "benchmarks"))  # serving.py's server starter and workload constants


@pytest.fixture(scope="module")
def server():
    """One `alora serve` on a free loopback port for both benchmarks (started by serving.py's own starter)."""
    from serving import TARGETS, serve

    with serve(TARGETS["alora"], kv_cache_gb=0.5) as (url, pid):
        yield url, pid


def _bench(script: str, out: Path, *args: str) -> str:
    """Run a benchmark's --quick mode (bounded: 60 s) and return its stdout."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_serving_quick_against_a_live_server(server, tmp_path):
    from serving import QUICK, SYSTEMS

    url, pid = server
    out = tmp_path / "serving_quick.json"
    stdout = _bench("serving.py", out, "--url", url, "--server-pid", str(pid), "--concurrency", "2")
    result = json.loads(out.read_text())
    assert result["benchmark"] == "serving" and result["quick"] is True and result["target"] == "alora"
    assert [(r["system"], r["K"]) for r in result["runs"]] == [("alora", 2), ("lora", 2)]
    calls = [QUICK.calls_per_turn[t % len(QUICK.calls_per_turn)] for t in range(QUICK.turns)]
    for r in result["runs"]:
        assert r["errors"] == [] and not r["cut_at_time_limit"]
        assert r["requests"] == len(r["replies"]) == 2 * (QUICK.turns + sum(calls))
        assert r["base"]["requests"] == 2 * QUICK.turns and r["intrinsic"]["requests"] == 2 * sum(calls)
        assert {x["model"] for x in r["replies"] if x["kind"] == "intrinsic"} <= set(SYSTEMS[r["system"]])
        assert r["output_tokens"] == sum(x["completion_tokens"] for x in r["replies"]) > 0
        assert r["output_tok_s"] > 0 and r["requests_s"] > 0
        # later turns extend earlier prompts: their prefixes come from the cache, never more than the prompt
        assert 0 < r["cached_tokens"] < r["prompt_tokens"]
        assert all(0 <= x["cached_tokens"] <= x["prompt_tokens"] for x in r["replies"])
        assert 0 < r["cache_hit_rate_metrics"] <= 1
        for kind in ("base", "intrinsic"):
            assert 0 < r[kind]["ttft_p50_s"] <= r[kind]["latency_p50_s"] <= r[kind]["latency_p99_s"]
        kv = r["kv"]
        assert kv["per_conversation_bytes"] > 0 and kv["capacity_over_budget_samples"] == 0
        assert kv["capacity_peak_bytes"] <= kv["budget_bytes"] == 0.5 * 2**30
        assert r["other_cpu_cores"] >= 0 and isinstance(r["flagged"], bool)
    assert len(result["targets"]) == 4
    assert all(t["status"] in ("met", "missed", "not evaluated") for t in result["targets"])
    assert result["cpu_guard"]["samples"] == 2
    assert "Targets (issue 10)" in stdout
    assert out.with_suffix(".png").stat().st_size > 10_000


@pytest.mark.slow
def test_soak_quick_against_a_live_server(server, tmp_path):
    url, pid = server
    out = tmp_path / "soak_quick.json"
    _bench("soak.py", out, "--url", url, "--server-pid", str(pid), "--minutes", "0.2")
    result = json.loads(out.read_text())
    soak = result["soak"]
    assert result["benchmark"] == "soak" and result["verdict"].startswith("smoke run")
    assert sum(c.get("ok", 0) for c in soak["requests"].values()) > 0
    assert soak["errors"] == [] and all(c.get("errors", 0) == 0 for c in soak["requests"].values())
    assert soak["running_at_end"] == 0  # cancelled streams left nothing running
    assert len(soak["samples"]) >= 5 and all(s["rss_mb"] > 0 for s in soak["samples"])
    assert result["flatness"]["rss"]["samples"] >= 3
    assert out.with_suffix(".png").stat().st_size > 10_000
