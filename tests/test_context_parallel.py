"""Context parallelism (step9): ring attention against full causal attention, the load balance of the zigzag
split, per-step parity with the single-process step3 baseline in cp layouts up to 4D, step9 with cp 1
equal to step8, the grid with a cp axis, and bad layouts."""
import json
import math
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from conftest import ROOT, TRAINING_LOOP, assert_parity, concurrently, import_step, run_env

# The same global batch of 4 sequences as the 3D test in test_pipeline_parallel.py (so the step3 baseline
# and the step8 run are shared with it through the run cache): micro_batch_size x grad_acc x dp_size = 4.
COMMON = ["--seq_len", 32, "--learning_rate", 1e-3, "--gradient_accumulation_steps", 2, "--max_tokens", 20 * 4 * 32,
          *TRAINING_LOOP]
BASELINE = ("step3", 1, "--micro_batch_size", 2)
STEP8_3D = ("step8", 8, "--micro_batch_size", 1, "--tp_size", 2, "--pp_size", 2, "--dp_size", 2, "--pp_engine", "1f1b")
LAYOUTS = {
    "cp2": ("step9", 2, "--micro_batch_size", 2, "--cp_size", 2),
    "cp4": ("step9", 4, "--micro_batch_size", 2, "--cp_size", 4),
    "cp2_tp2": ("step9", 4, "--micro_batch_size", 2, "--cp_size", 2, "--tp_size", 2),
    "cp2_dp2": ("step9", 4, "--micro_batch_size", 1, "--cp_size", 2, "--dp_size", 2),
    "cp2_pp2_1f1b": ("step9", 4, "--micro_batch_size", 2, "--cp_size", 2, "--pp_size", 2, "--pp_engine", "1f1b"),
    "cp2_tp2_pp2_1f1b": ("step9", 8, "--micro_batch_size", 2, "--cp_size", 2, "--tp_size", 2, "--pp_size", 2,
                         "--pp_engine", "1f1b"),
}
STEP9_3D_CP1 = ("step9", *STEP8_3D[1:])


@pytest.fixture(scope="module")
def runs(torchrun):
    """Every launch of this module, two at a time (each is mostly interpreter start-up). The cp2 run prints
    its ring exchanges (VERBOSE=1 is part of the run cache key); step8_3d, launched without it, is also
    tests/test_pipeline_parallel.py's 3D run (the launcher caches it)."""
    launches = {"baseline": BASELINE, "step8_3d": STEP8_3D, "step9_3d_cp1": STEP9_3D_CP1, **LAYOUTS}

    def launch(item):
        name, (step, nproc, *args) = item
        return name, torchrun(step, nproc, *COMMON, *args, env={"VERBOSE": "1"} if name == "cp2" else None)

    return dict(concurrently(launch, launches.items()))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_losses_match_the_single_process_baseline(runs, layout):
    reference, run = runs["baseline"], runs[layout]
    assert_parity(run, reference, steps=20)


def test_step9_with_cp_1_reproduces_step8_exactly(runs):
    """tp 2 x pp 2 x dp 2 (1F1B): with cp_size 1 step 9 runs step 8's attention and the same averaging."""
    step8, step9 = runs["step8_3d"], runs["step9_3d_cp1"]
    assert step8.returncode == 0, step8
    assert step9.returncode == 0, step9
    assert len(step8.losses) == 20
    assert step9.losses == step8.losses


def test_verbose_prints_ring_exchanges_and_the_computed_parts(runs):
    run = runs["cp2"]
    assert run.returncode == 0, run
    # per attention layer (4) and micro-batch (2 x 20 steps): one kv hop forward, one kv hop and two dkv hops backward
    kv_sends = re.findall(r"\[rank 0 \| cp 0/2\] ring exchange: send kv \(2, 2, 4, 16, 32\) -> rank 1, recv <- rank 1\n",
                          run.stdout)
    dkv_sends = re.findall(r"\[rank 1 \| cp 1/2\] ring exchange: send dkv \(2, 2, 4, 16, 32\) -> rank 0", run.stdout)
    assert len(kv_sends) == 2 * 4 * 2 * 20
    assert len(dkv_sends) == 2 * 4 * 2 * 20
    # rank 0 holds chunks (0, 3), rank 1 chunks (1, 2): on the second step rank 0's back half sees all of rank 1's
    # keys and its front half nothing; rank 1 sees the front chunk of rank 0 and skips its back chunk.
    assert ("[rank 0 | cp 0/2] forward step 2/2, kv of cp rank 1: queries [back half] x keys [all] full, "
            "queries [front half] skipped\n") in run.stdout
    assert ("[rank 1 | cp 1/2] forward step 2/2, kv of cp rank 0: queries [all] x keys [front half] full, "
            "keys [back half] skipped\n") in run.stdout
    assert "[rank 1 | cp 1/2] forward step 1/2, kv of cp rank 1: queries [all] x keys [all] causal diagonal\n" in run.stdout


@pytest.fixture(scope="module")
def ring_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("ring") / "ring.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
               str(ROOT / "tests" / "cp_attention_check.py"), str(out)]
    proc = subprocess.run(command, cwd=ROOT, env=run_env(out.parent), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {int(cp_size): result for cp_size, result in json.loads(out.read_text()).items()}


@pytest.mark.parametrize("cp_size", [2, 3, 4])
def test_ring_attention_equals_full_causal_attention(ring_check, cp_size):
    """Output and q/k/v gradients of every rank's tokens against scaled_dot_product_attention on the whole
    sequence, with grouped-query attention (8 heads, 2 kv heads), fp32: the fused kernels and the fp32
    reference spelling alike (measured: at most 1.9e-6)."""
    result = ring_check[cp_size]["float32"]
    for kind in ("fused_vs_full", "reference_vs_full"):
        assert set(result[kind]) == {"output", "grad_q", "grad_k", "grad_v"}
        for name, difference in result[kind].items():
            assert difference <= 1e-5, (kind, name, difference)


# Largest |fused - reference| and |fused - full| in bf16, as a fraction of the largest |value| of each
# result: measured at most 9.4e-3 (about one bf16 rounding of the largest value, 2^-7 = 7.8e-3).
BF16_TOLERANCE = 2e-2


@pytest.mark.parametrize("cp_size", [2, 3, 4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_ring_attention_equals_the_reference_spelling(ring_check, cp_size, dtype):
    """The ring with fused kernels per block pair against the same ring with reference_block_forward /
    reference_block_backward swapped in. fp32: within 1e-5 (measured at most 1.9e-6)."""
    result = ring_check[cp_size][dtype]
    for kind in ("fused_vs_reference", "fused_vs_full"):
        for name, difference in result[kind].items():
            if dtype == "float32":
                assert difference <= 1e-5, (kind, name, difference)
            else:
                assert difference <= BF16_TOLERANCE * result["largest_value"][name], (kind, name, difference)
                assert difference > 0  # bf16 rounding shows: the ring really computed in bf16


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("dtype,tolerance,lse_tolerance", [(torch.float32, 1e-6, 2e-6), (torch.bfloat16, 1e-2, 2e-4)])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_block_kernels_equal_the_reference_spelling(device, dtype, tolerance, lse_tolerance, causal):
    """One block pair in-process, for every kernel attention_block_forward / attention_block_backward pick
    (CPU flash; CUDA flash in bf16, memory-efficient in fp32): output, lse and q/k/v gradients against
    reference_block_forward / reference_block_backward, with grouped queries (8 heads, 2 kv heads), a causal
    diagonal block and a full block of half as many queries as keys, 40 queries (not a multiple of 32: the
    memory-efficient kernel's padded lse). The backward gets an lse above the block's own, as in a ring where
    other blocks share the row. Largest difference as a fraction of the largest |value|, measured on the
    CPU: fp32 4.4e-7, bf16 5.8e-3; lse in absolute terms: fp32 4.8e-7, bf16 6.1e-5. The CUDA cases run only on a
    GPU: on an H200 (torch 2.11) every one passed the CPU's tolerances except fp32 with a full block (the
    memory-efficient kernel), 1.06e-6 of the largest value, so fp32 on CUDA is held to 3e-6."""
    if device == "cuda" and dtype == torch.float32:
        tolerance = 3e-6
    cp = import_step("step9", "context_parallel")
    q_len, k_len = (40, 40) if causal else (40, 80)
    generator = torch.Generator().manual_seed(0)
    q, grad_out = (torch.randn(2, 8, q_len, 16, generator=generator).to(device, dtype) for _ in range(2))
    k, v = (torch.randn(2, 2, k_len, 16, generator=generator).to(device, dtype) for _ in range(2))
    out, lse = cp.attention_block_forward(q, k, v, causal=causal)
    reference_out, reference_lse = cp.reference_block_forward(q, k, v, causal=causal)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (2, 8, q_len)
    assert (lse - reference_lse).abs().max().item() <= lse_tolerance
    row_lse = reference_lse + math.log(2)  # as if another block held as much of each row as this one
    inputs = dict(grad_out=grad_out, q=q, k=k, v=v, out=reference_out.to(dtype), lse=row_lse, causal=causal)
    grads = cp.attention_block_backward(**inputs)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    for fused, reference in [(out, reference_out), *zip(grads, cp.reference_block_backward(**inputs))]:
        assert (fused.float() - reference).abs().max().item() <= tolerance * reference.abs().max().item()


def causal_pairs(positions):
    """(query, key) pairs causal attention needs for these query positions: the one at p sees keys 0..p."""
    return sum(p + 1 for p in positions)


@pytest.mark.parametrize("cp_size", [2, 3, 4])
def test_zigzag_split_balances_the_work_and_a_contiguous_one_would_not(ring_check, cp_size):
    ranks = ring_check[cp_size]["float32"]["ranks"]
    seq_len = len(ranks[0]["positions"]) * cp_size
    # Each cp group's ranks hold disjoint positions that together are the whole sequence.
    groups = {}
    for rank in ranks:
        groups.setdefault(rank["cp_rank"], set()).update(rank["positions"])
    assert sorted(p for cp_rank in range(cp_size) for p in groups[cp_rank]) == list(range(seq_len))
    # What ring attention computed (counted per batch and head) is exactly what the causal mask leaves of
    # each rank's queries: nothing wasted, nothing missing, and the same on every rank.
    computed = [rank["pairs"] for rank in ranks]
    assert computed == [causal_pairs(rank["positions"]) for rank in ranks]
    assert len(set(computed)) == 1
    num_rings = len(ranks) // cp_size
    assert sum(computed) == num_rings * seq_len * (seq_len + 1) // 2
    # A contiguous split of the same sequence: rank r holds positions [r * seq / cp, (r + 1) * seq / cp).
    local = seq_len // cp_size
    contiguous = [causal_pairs(range(r * local, (r + 1) * local)) for r in range(cp_size)]
    assert sum(contiguous) == seq_len * (seq_len + 1) // 2
    assert contiguous == sorted(contiguous) and contiguous[-1] > 2 * contiguous[0], contiguous
    print(f"cp {cp_size}, seq {seq_len}: zigzag pairs per rank {computed[0]}, contiguous {contiguous}")


def test_zigzag_indices_take_a_chunk_from_the_front_and_its_mirror_from_the_back():
    cp = import_step("step9", "context_parallel")
    assert [cp.zigzag_indices(8, 2, r).tolist() for r in range(2)] == [[0, 1, 6, 7], [2, 3, 4, 5]]
    assert [cp.zigzag_indices(8, 4, r).tolist() for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]


def test_grid_has_a_cp_axis_between_tp_and_pp():
    pgm = import_step("step9", "process_group_manager")
    groups = pgm.grid_groups(2, 2, 2, 1)  # tp, cp, pp, dp
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["cp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["cp_dp"] == groups["cp"]  # dp 1: the ranks that share weights are the cp group
    groups = pgm.grid_groups(1, 2, 1, 2)
    assert groups["cp_dp"] == [[0, 1, 2, 3]] and groups["dp"] == [[0, 2], [1, 3]]
    for rank in range(16):
        coordinates = pgm.grid_coordinates(rank, 2, 2, 2)
        assert pgm.grid_rank(*coordinates, 2, 2, 2) == rank
    config = SimpleNamespace(num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4, intermediate_size=768,
                             vocab_size=4096, tie_word_embeddings=False)
    assert pgm.validate_layout(8, 2, 2, 2, 1, config, seq_len=32) == []
    assert pgm.validate_layout(4, 1, 4, 1, 1, config, seq_len=20) == ["seq_len 20 is not divisible by 2 x cp_size = 8"]


BAD = {
    "seq_len_vs_cp": (2, ["--cp_size", 2, "--seq_len", 30], "seq_len 30 is not divisible by 2 x cp_size = 4"),
    "world_size": (4, ["--cp_size", 2, "--tp_size", 1], "world size 4 != dp_size 1 x pp_size 1 x cp_size 2 x tp_size 1 = 2"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_cp_layout_is_one_clear_line(torchrun, name):
    nproc, args, message = BAD[name]
    start = time.time()
    run = torchrun("step9", nproc, *args, "--max_tokens", 64, cached=False, timeout=120)
    assert time.time() - start < 60
    assert run.returncode != 0
    error_lines = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in error_lines[0], run
    assert "Step: 1" not in run.stdout


def test_without_position_ids_a_context_parallel_model_refuses_to_guess():
    """Under the zigzag split positions 0..seq-1 would be wrong: a cp model without position_ids stops."""
    model_module, cp = import_step("step9", "model", "context_parallel")
    config = SimpleNamespace(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0)
    model = model_module.Llama(config)
    input_ids = torch.randint(0, 64, (1, 8))
    assert model(input_ids).shape == (1, 8, 64)  # a whole sequence: positions 0..7 are right
    cp.apply_context_parallel(model)
    with pytest.raises(ValueError, match="position_ids are required under context parallelism"):
        model(input_ids)


def test_cp_with_spawned_dataloader_workers_equals_no_workers(torchrun, tmp_path_factory, small_corpus):
    """cp 2 on small_corpus (an epoch of 10 steps) with --num_workers 1, the worker started by spawn (macOS's
    default; forced here by a sitecustomize.py on PYTHONPATH, which also records every interpreter start). A
    spawned worker has no process grid, so the cp split must happen in the training process. 12 steps cross the
    epoch end, and the worker carries on across it (the sampler never ends: no new iterator, no new worker); the
    losses equal those of --num_workers 0."""
    site = tmp_path_factory.mktemp("spawn")
    starts = site / "starts.txt"
    (site / "sitecustomize.py").write_text(
        "import multiprocessing, sys\n"
        "multiprocessing.set_start_method('spawn', force=True)\n"
        f"with open({str(starts)!r}, 'a') as file:\n"
        "    file.write(' '.join(sys.orig_argv) + '\\n')\n")
    args = ["--cp_size", 2, "--seq_len", 32, "--micro_batch_size", 2, "--gradient_accumulation_steps", 2,
            "--max_tokens", 12 * 4 * 32, "--dataset_name", small_corpus]
    python_path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    with mock.patch.dict(os.environ, {"PYTHONPATH": python_path}):
        runs = torchrun.many({workers: ("step9", 2, *args, "--num_workers", workers) for workers in (1, 0)},
                             cached=False)
    spawned, no_workers = runs[1], runs[0]
    assert spawned.returncode == 0, spawned
    assert "starting epoch 1" in spawned.stdout
    # 2 ranks x 1 worker, each a fresh interpreter, for both epochs
    assert starts.read_text().count("multiprocessing.spawn import spawn_main") == 2
    assert len(spawned.losses) == 12 and spawned.losses == no_workers.losses
