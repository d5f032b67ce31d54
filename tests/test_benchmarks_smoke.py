"""`benchmarks/switch_latency.py --quick` runs end to end and writes results of the documented shape.

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
    # one thread: on a machine whose cores are busy (a parallel test run) more threads only contend
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "switch_latency.py"), "--quick",
                           "--threads", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), out, proc.stdout


def test_header_names_machine_versions_and_model(quick):
    result, _, _ = quick
    assert result["benchmark"] == "switch_latency" and result["quick"] is True
    assert result["machine"]["cpu"] and result["machine"]["torch_threads"] == 1
    assert set(result["versions"]) >= {"torch", "transformers", "peft", "alora"}
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
            assert data["median_ttft_s"] <= data["median_total_s"]
        alora, lora = p["methods"]["alora_invoke"]["runs"], p["methods"]["lora_invoke"]["runs"]
        assert all(r["reused_tokens"] == L and r["recomputed_tokens"] == 0 for r in alora)
        assert all(r["prefill_tokens"] == p["invocation_tokens"] for r in alora)
        assert all(r["reused_tokens"] == 0 and r["recomputed_tokens"] == L for r in lora)
        assert all(r["copy_s"] >= 0 for r in p["methods"]["peft_alora"]["runs"])
        assert all(0 <= r["merge_s"] <= r["total_s"] for r in p["methods"]["merge_swap"]["runs"])
        for kind in ("ttft", "total"):
            assert set(p["ratios"][kind]) == {"lora/alora", "merge_swap/alora", "peer/ours alora",
                                              "peer/ours lora", "alora/base_floor"}
            assert all(v > 0 for v in p["ratios"][kind].values())
        # same greedy tokens as PEFT's own aLoRA and LoRA paths
        assert p["outputs_agree"]["alora_invoke==peft_alora"] and p["outputs_agree"]["lora_invoke==peft_lora"]
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
