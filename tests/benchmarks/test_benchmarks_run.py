"""The benchmarks prove issue lines, so CI runs each one small: it must finish and end with its JSON.

Sizes here are far too small for the figures to mean anything; only the structure and the
correctness checks each benchmark makes (same answers, same embeddings, rows stored) are asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests_support import ROOT


def _run(script: str, *args: str, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "MLFLOW_"))}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last)  # the last stdout line is the JSON object, nothing after it


@pytest.mark.slow  # ~170 s: real encoders over real images, several batch sizes
@pytest.mark.timeout(900)
def test_extract_benchmark_runs(tmp_path):
    r = _run("extract.py", "--images", "32", "--mem-sizes", "300,600", "--precision-images", "8", "--decode-images", "64",
             "--rounds", "1", tmp_path=tmp_path)
    t, m, p, d = r["throughput"], r["memory"], r["precision"], r["decode"]
    assert t["n_stored"] == t["n_images"] == 32 and t["n_errors"] == 0
    assert len(t["bare_items_per_s_passes"]) == len(t["flow_items_per_s_passes"]) == 3
    assert t["max_abs_diff_flow_vs_bare_embeddings"] < 1e-5  # the flow and the bare loop did the same work
    # the headline ratio is what the passes it summarises say (best flow run / best bare pass)
    assert t["ratio_flow_over_bare"] == pytest.approx(max(t["flow_items_per_s_passes"]) / max(t["bare_items_per_s_passes"]), rel=2e-3)
    assert t["meets_goal"] == (t["ratio_flow_over_bare"] >= 1.0)
    assert t["torch_threads_after_flow"] == r["torch_threads"]
    assert [m["runs"][k]["n_store"] for k in ("300", "600")] == [300, 600]
    assert not m["runs"]["300"]["imported_prefect"]
    # (c) bf16 really ran (the store says so) and stayed within cosine 0.999 of fp32; fp32 runs agree exactly
    assert p["store_compute_dtype"] == "bf16" and p["min_cosine_bf16_vs_fp32"] >= 0.999
    # ViT-B-32 is 8.7 GFLOP an image; FlopCounterMode under inference_mode sees 5.9 (the fused attention hides its projections)
    assert p["max_abs_diff_fp32_stores_vs_each_other"] < 1e-6 and p["flops_per_image"] > 8e9
    assert set(p["items_per_s"]) == {"bare fp32", "bare bf16 autocast", "xmodal fp32", "xmodal fp32 cpu_workers=1",
                                     "xmodal bf16", "xmodal bf16 cpu_workers=1"}
    # (d) every worker count decoded every image (the rate counts the batches after the first)
    assert set(d["items_per_s"]) == {"0", "1", "2", str(r["usable_cpus"])} and d["n_images"] == 64
    assert r["gpu_plan"]["workers_needed"] >= 1


@pytest.mark.timeout(900)
def test_finetune_benchmark_runs(tmp_path):
    r = _run("finetune.py", "--items", "4", "--batch", "4", "--epochs", "1", "--rounds", "1", tmp_path=tmp_path)
    assert r["steps"] == {"bare": 1, "xmodal": 1}  # same schedule on both sides
    assert r["flops_per_step"] > 4 * 5.8e9  # at least the forward pass of 4 ViT-B-32 images
    assert set(r["ratio_xmodal_over_bare"]) == {"fp32", "bf16"} and len(r["steps_per_s_rounds"]["xmodal bf16"]) == 1


@pytest.mark.timeout(600)  # its fixed N=50k baseline fits take minutes on a loaded 2-core machine
def test_align_benchmark_runs(tmp_path):
    r = _run("align.py", "--repeats", "1", "--n", "2000", "--epochs", "1", "--budget-s", "1", tmp_path=tmp_path)
    # the throughput ratio compares equal work: same steps, and (constant LR, no decay/clip) the same weights
    assert r["same_weights_as_bare_loop"] and r["trainer_steps"] == r["bare_steps"]
    assert r["train_vs_bare_ratio"] == pytest.approx(r["train_default_samples_per_s"] / r["bare_fused_clip_samples_per_s"], rel=2e-3)


@pytest.mark.timeout(300)
def test_search_memory_benchmark_runs(tmp_path):
    r = _run("search_memory.py", "--rows", "5000", "--dim", "64", "--queries", "8", "--repeats", "1", tmp_path=tmp_path)
    (run,) = r["runs"]
    assert run["same_answers"] and run["top1_correct"] and not run["top_k_imported_torch"]


@pytest.mark.timeout(300)
def test_search_ann_benchmark_runs(tmp_path):
    r = _run("search.py", "--rows", "20000", "--dim", "32", "--clusters", "100", "--queries", "100", "--single", "10",
             "--repeats", "1", "--flat-below", "1000", tmp_path=tmp_path)
    # the tuned index meets its recall target on new queries, against the exact search run beside it
    assert r["index"].startswith("IVF") and r["recall_at_k"] >= 0.95 and r["exact_memory_recall_at_k"] == 1.0
    assert r["build_s"] > 0 and r["index_mib"] > 0 and r["meets_goal"] == (r["speedup_batch_vs_exact_top_k"] >= 20)
    assert r["speedup_batch_vs_exact_top_k"] == pytest.approx(
        r["queries_per_s_batch"]["faiss"] / r["queries_per_s_batch"]["exact_top_k"], rel=0.05)


@pytest.mark.timeout(600)
def test_semi_benchmark_runs(tmp_path):
    r = _run("semi.py", "--sets", "sklearn-cancer-views,digits-random-migration", "--fracs", "0.05,1", "--steps", "20",
             "--hidden", "16", "--max-rows", "400", "--out", str(tmp_path / "semi"), tmp_path=tmp_path)
    for name in ("sklearn-cancer-views", "digits-random-migration"):
        rows = r["curves"][name]
        assert [row["n_pairs"] for row in rows] == [18, 360]  # 5 % of 360 training rows; test 40 held out
        assert rows[1]["semi"] is None and rows[1]["n_unpaired"] == 0  # all paired: nothing unpaired to use
        assert rows[0]["semi_chosen"] in {"mlp_pairs", "ridge", "procrustes", "centred", "transport"}
        s = r["summary"][name]
        full = max(rows[1][m] for m in ("ridge", "procrustes", "mlp"))
        assert s["full_r1"] == full and s["0.05"]["fraction"] == pytest.approx(rows[0]["semi"] / full, abs=1e-3)
    assert r["summary"]["sklearn-cancer-views"]["not_tuned_on"] and not r["summary"]["digits-random-migration"]["not_tuned_on"]


@pytest.mark.slow  # ~70 s
@pytest.mark.timeout(300)
def test_defaults_benchmark_runs(tmp_path):
    r = _run("defaults.py", "--quick", "--no-repo", "--only", "linear_n200_,relu_n1000", "--split-seeds", "0,1",
             tmp_path=tmp_path)
    rows = r["sets"]
    assert len(rows) == 4 and r["mlp_below_ridge"] == []
    for name, row in rows.items():  # the linear map ends as ridge; the ReLU map is learnt past it
        assert (row["mlp_r1"] > row["ridge_r1"]) if "relu" in name else row["kept_ridge_start"], (name, row)


@pytest.mark.timeout(600)
def test_store_torture_benchmark_runs(tmp_path):
    r = _run("store_torture.py", "--trials", "12", tmp_path=tmp_path)
    assert r["trials"] == r["killed"] == 12 and r["by_batch_size"] == {"8": 4, "64": 4, "128": 4}
    assert r["by_mode"]["commit"] == 6 and r["kills_inside_commit"] >= 3  # half are timed to land in a commit
    assert r["identical"] == r["reruns_ok_first_try"] == 12
    assert r["unreadable_complete"] == r["lost_committed_batches"] == r["leftover_files"] == 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_scale_benchmark_runs(tmp_path):
    r = _run("scale.py", "--pairs", "10000", "--speed-pairs", "10000", "--mem-pairs", "0", "--budget-gb", "0.001",
             "--speed-budget-gb", "0.001", "--flow-steps", "30", "--block", "5", "--blocks", "2", "--warm", "5",
             "--work", str(tmp_path / "scale"), tmp_path=tmp_path)
    flow = r["flow"]  # (d), the in-memory linear align, is the same child with other arguments: not run here
    assert flow["steps"] == 30 and flow["train_set"] == "ChunkedPairs" and not flow["in_memory"]  # cut as asked, streamed
    assert r["meets_goal"]["rss_le_2x_budget"] == (flow["peak_rss_mib"] <= 2 * 0.001 * 1024)  # False at this toy budget
    assert {"baselines", "projector (fit stats, train, val)", "evaluation (test ranks)"} <= set(flow["rss_by_phase_mib"])
    assert flow["code"].startswith(str(ROOT)) and flow["peak_rss_mib"] > 0
    assert flow["test_p2t_r1"]["ridge"] > 0.5  # the stores hold a learnable map, read back through the flow
    # (c) the flow's own loop (streamed, over the same stores) and the bare loop took turns, block by block
    s = r["speed"]
    assert s["streamed"] and s["train_set"] == "ChunkedPairs" and s["blocks_each"] == 2 and s["block"] == 5
    assert len(s["flow_block_s"]) == len(s["bare_block_s"]) == len(s["ratio_pairs"]) == 2
    # the headline rates are the blocks' steps over the blocks' time, and the ratio is theirs
    assert s["flow_steps_per_s"] == pytest.approx(10 / sum(s["flow_block_s"]), rel=0.02)
    assert s["bare_steps_per_s"] == pytest.approx(10 / sum(s["bare_block_s"]), rel=0.02)
    assert s["ratio_flow_over_bare"] == pytest.approx(s["flow_steps_per_s"] / s["bare_steps_per_s"], rel=2e-3)
    assert r["meets_goal"]["steps_ge_0.9x_bare"] == (s["ratio_flow_over_bare"] >= 0.9)
    # one step of the 1280 -> 1024 -> 384 MLP beside a frozen 1280 -> 384 path, batch 256: the forward alone is
    # 2 * 256 * (1280 * 1024 + 1024 * 384 + 1280 * 384) FLOPs; backward adds about as much again
    forward = 2 * 256 * (1280 * 1024 + 1024 * 384 + 1280 * 384)
    assert 1.5 * forward < s["flops_per_step"] < 3 * forward
    assert s["flop_limit_steps_per_s"] == pytest.approx(s["gemm_peak_gflops"] * 1e9 / s["flops_per_step"], rel=0.01)
