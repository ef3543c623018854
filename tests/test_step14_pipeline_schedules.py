"""Step 14, interleaved 1F1B and zero bubble (ZB-H1) (`python -m pytest tests -k step14`):

- every schedule trains the single-process run (the parity contract): interleaved 1F1B with 1 and 2 chunks per
  stage, composed with tp + sequence parallelism, cp and ZeRO-2; ZB-H1 at pp 2 with dp and ZeRO-3 and with tp +
  sequence parallelism + full recomputation, and at pp 4 alone; interleaved with 4 chunks (8 layers) equals one
  process of the same 8-layer model;
- the micro-batches of activations each stage held at most (logged under VERBOSE=1) are each schedule's theory,
  and every stage ran one W per micro-batch with one weight gradient per linear it holds;
- the tables themselves (pure Python): held and bubble formulas against the schedules and their simulation, and
  the weight-gradient split in one process: one queued W per linear, the same gradients as an unsplit backward;
- at parallel sizes 1 step 14 is step 13 bit for bit (the chain);
- a checkpoint saved under ZB-H1 resumes under interleaved 1F1B with 2 chunks (the names are the full model's);
- bad input: chunks without interleaving or without a pipeline, more chunks than layers, micro-batches that pp
  does not divide.
The bubble of each schedule against its formula is tools/pipeline_bubble.py's (tests/test_pipeline_bubble.py)."""
import re
import sys

import pytest
import torch

from conftest import assert_parity, import_step, max_abs_diff
from test_zero import BASELINE, COMMON

PP2 = ["--micro_batch_size", 1, "--gradient_accumulation_steps", 4, "--pp_size", 2]  # the baseline's batch of 4
INTERLEAVED = ["--pp_engine", "interleaved_1f1b"]
ZB = ["--pp_engine", "zb_h1"]
SP = ["--tp_size", 2, "--sequence_parallel"]
LAYOUTS = {
    "pp2_interleaved_v2_cp2_zero2": (4, *PP2, *INTERLEAVED, "--virtual_pp_size", 2, "--cp_size", 2,
                                     "--zero_stage", 2),
    "pp2_interleaved_v1_tp2_sp": (4, *PP2, *INTERLEAVED, *SP),
    "pp2_zb_dp2_zero3": (4, "--micro_batch_size", 1, "--gradient_accumulation_steps", 2, "--pp_size", 2, "--dp_size",
                         2, *ZB, "--zero_stage", 3),
    "pp2_zb_tp2_sp_full": (4, *PP2, *ZB, *SP, "--recompute", "full"),
    "pp4_zb": (4, "--micro_batch_size", 1, "--gradient_accumulation_steps", 4, "--pp_size", 4, *ZB),
}
SHORT = ["--max_tokens", 10 * 4 * 32]  # the runs compared with another run of step 14 (not the baseline)
EIGHT = ["--num_hidden_layers", 8, "--micro_batch_size", 2, "--gradient_accumulation_steps", 2]
RESUMED = ["--micro_batch_size", 1, "--gradient_accumulation_steps", 2, "--pp_size", 2, "--max_tokens", 10 * 2 * 32]
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def runs(torchrun, tmp_path_factory):
    """Every launch of this module, two at a time, under VERBOSE=1 (each stage logs what it held and its W passes);
    the baseline, launched without it, is shared with the other parity tests. zb_saved saves at steps 5 and 10 under
    ZB-H1; "resumed", the last launch, resumes a copy of its save_dir as a run stopped after step 5 leaves it, under
    interleaved 1F1B with 2 chunks a stage."""
    baseline = torchrun(*BASELINE)
    folder = tmp_path_factory.mktemp("step14_checkpoints")
    save_dir, halfway = folder / "checkpoints", folder / "halfway"
    launches = {"zb_saved": ("step14", 2, *COMMON, *RESUMED, *ZB, "--save_dir", save_dir, "--save_every", 5),
                **{name: ("step14", nproc, *COMMON, *args) for name, (nproc, *args) in LAYOUTS.items()},
                "pp2_interleaved_v4": ("step14", 2, *COMMON, *EIGHT, *SHORT, "--pp_size", 2, *INTERLEAVED,
                                       "--virtual_pp_size", 4),
                "one_eight": ("step14", 1, *COMMON, *EIGHT, *SHORT),
                "step13_one_eight": ("step13", 1, *COMMON, *EIGHT, *SHORT),
                "resumed": ("step14", 2, *COMMON, *RESUMED, *INTERLEAVED, "--virtual_pp_size", 2, "--save_dir",
                            halfway, "--resume")}
    return {"baseline": baseline,
            **torchrun.many_then_resume(launches, saver="zb_saved", save_dir=save_dir, halfway=halfway,
                                        drop="step_000010", env_of=lambda name: {"VERBOSE": "1"})}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_step14_schedules_match_the_single_process_baseline(runs, layout):
    assert_parity(runs[layout], runs["baseline"], steps=20)


def test_step14_four_chunks_per_stage_match_one_process(runs):
    one, interleaved = runs["one_eight"], runs["pp2_interleaved_v4"]
    assert one.returncode == 0 and interleaved.returncode == 0, (one, interleaved)
    assert len(one.losses) == len(interleaved.losses) == 10
    assert max_abs_diff(interleaved.losses, one.losses) <= 1e-5, (interleaved.losses, one.losses)
    assert interleaved.grad_norms == pytest.approx(one.grad_norms, rel=1e-5)


def test_step14_at_parallel_sizes_1_is_step_13_bit_for_bit(runs):
    step13, step14 = runs["step13_one_eight"], runs["one_eight"]
    assert step13.returncode == 0, step13
    assert len(step14.losses) == 10 and step14.losses == step13.losses  # identical floats


def stage_logs(run, pattern):
    """{stage: [match groups]} from the VERBOSE lines `[rank g | stage s/p] ...` that match pattern."""
    found = {}
    for stage, *groups in re.findall(r"\[rank \d+ \| stage (\d+)/\d+\] " + pattern, run.stdout + run.stderr):
        found.setdefault(int(stage), []).append(groups)
    return found


@pytest.mark.parametrize("layout, engine, pp_size, micro_batches, chunks", [
    ("pp2_interleaved_v2_cp2_zero2", "interleaved_1f1b", 2, 4, 2),
    ("pp2_interleaved_v1_tp2_sp", "interleaved_1f1b", 2, 4, 1),
    ("pp2_interleaved_v4", "interleaved_1f1b", 2, 2, 4),
    ("pp4_zb", "zb_h1", 4, 4, 1),
    ("pp2_zb_dp2_zero3", "zb_h1", 2, 2, 1),
])
def test_step14_each_stage_holds_what_the_schedule_says(runs, layout, engine, pp_size, micro_batches, chunks):
    """Every step of every rank logs the most (chunk, micro-batch) pairs it held at once: the formula's."""
    schedules = import_step("step14", "pipeline_schedules")
    run = runs[layout]
    assert run.returncode == 0, run
    held = stage_logs(run, rf"{engine}: held at most (\d+) micro-batches")
    assert sorted(held) == list(range(pp_size)), run.stdout[-2000:]
    for stage, peaks in held.items():
        expected = schedules.held_theory(engine, pp_size, stage, micro_batches, chunks)
        assert {int(peak) for peak, in peaks} == {expected}, (stage, peaks, expected)
    print(f"{layout}: held per stage {[held[s][0][0] for s in range(pp_size)]}")


@pytest.mark.parametrize("layout, pp_size, micro_batches", [("pp4_zb", 4, 4), ("pp2_zb_tp2_sp_full", 2, 4)])
def test_step14_zb_runs_one_w_per_linear_per_micro_batch(runs, layout, pp_size, micro_batches):
    """Each stage's W of each micro-batch computes one weight gradient per linear the stage holds (the LM head's on
    the last stage), once per step (4 layers on pp 4: one layer a stage; every tp rank its own shards')."""
    run = runs[layout]
    assert run.returncode == 0, run
    passes = {}  # global rank -> (stage, [(micro-batch, linears)] in the order its W passes ran)
    for rank, stage, j, count in re.findall(r"\[rank (\d+) \| stage (\d+)/\d+\] W of micro-batch (\d+): (\d+) linears",
                                            run.stdout + run.stderr):
        passes.setdefault(int(rank), (int(stage), []))[1].append((int(j), int(count)))
    assert len(passes) == 4, sorted(passes)  # every rank ran W passes
    for stage, done in passes.values():
        linears = 4 // pp_size * LINEARS_PER_LAYER + (1 if stage == pp_size - 1 else 0)
        assert len(done) == 20 * micro_batches and {count for _, count in done} == {linears}, (stage, done[:8])
        for step in range(20):  # each micro-batch's W once a step
            assert sorted(j for j, _ in done[step * micro_batches:(step + 1) * micro_batches]) == list(
                range(micro_batches)), done


def test_step14_a_checkpoint_resumes_across_engines_and_chunks(runs):
    """Saved at step 5 of 10 under ZB-H1 (one chunk a stage), resumed under interleaved 1F1B with 2 chunks a stage
    (the module's runs zb_saved and resumed): the resumed steps are the uninterrupted run's."""
    whole, resumed = runs["zb_saved"], runs["resumed"]
    assert whole.returncode == 0, whole
    assert resumed.returncode == 0, resumed
    assert "resumed from step 5" in resumed.stdout, resumed.stdout[-2000:]
    assert len(resumed.losses) == 5
    assert max_abs_diff(resumed.losses, whole.losses[5:]) <= 1e-6, (resumed.losses, whole.losses)


def passes_held(engine, passes):
    """The most (chunk, micro-batch) pairs held at once by a table: a forward takes one, its backward (zb_h1: W)
    gives it back."""
    held = peak = 0
    for kind, _, _ in passes:
        held += {"F": 1, "B": 0 if engine == "zb_h1" else -1, "W": -1}[kind]
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("engine, chunks", [("1f1b", 1), ("interleaved_1f1b", 1), ("interleaved_1f1b", 2),
                                            ("interleaved_1f1b", 4), ("zb_h1", 1)])
def test_step14_tables_hold_and_idle_as_their_formulas(engine, chunks):
    """For pp 2 to 8 and 1 to 16 micro-batches: every stage's table holds held_theory at most, runs each pass of
    each micro-batch once, and the simulated step (passes of UNITS) idles bubble_theory of the busiest stage's
    work when there are at least pp_size micro-batches (fewer: the warm-up alone is longer)."""
    schedules = import_step("step14", "pipeline_schedules")
    units = schedules.SPLIT_UNITS if engine == "zb_h1" else schedules.UNITS
    for pp_size in (2, 3, 4, 8):
        for micro_batches in range(1, 17):
            if engine == "interleaved_1f1b" and micro_batches % pp_size:
                continue
            kinds = "FBW" if engine == "zb_h1" else "FB"
            for rank in range(pp_size):
                passes = schedules.SCHEDULES[engine](pp_size, rank, micro_batches, chunks)
                assert sorted(passes) == sorted(schedules.Pass(kind, chunk, j) for kind in kinds
                                                for chunk in range(chunks) for j in range(micro_batches))
                assert passes_held(engine, passes) == schedules.held_theory(engine, pp_size, rank, micro_batches,
                                                                              chunks)
            table = schedules.timetable(engine, pp_size, micro_batches, chunks)
            end = max(time + units[event[1].kind] for events in table for time, event in events if event[0] == "pass")
            work = micro_batches * chunks * 3  # F + B + W, or F + a backward of 2
            if micro_batches >= pp_size:
                assert (end - work) / work == pytest.approx(schedules.bubble_theory(engine, pp_size, micro_batches,
                                                                                    chunks))


def test_step14_split_backward_queues_one_w_per_linear_and_gives_the_same_gradients(monkeypatch):
    """One process, the tiny Llama: a backward inside deferred_weight_gradients leaves every linear's weight without
    a gradient and one queued W per linear; running them gives the unsplit backward's gradients."""
    train, model_module, zero_bubble, utils = import_step("step14", "train", "model", "zero_bubble", "utils")
    monkeypatch.setattr(sys, "argv", ["train.py"])
    config = utils.load_config(train.parse_args())
    torch.manual_seed(0)
    model = model_module.Llama(config)
    input_ids = torch.randint(0, config.vocab_size, (2, 16))
    position_ids = torch.arange(16).expand(2, 16)
    model(input_ids=input_ids, position_ids=position_ids).square().mean().backward()
    unsplit = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    try:
        zero_bubble.split_weight_gradients(model)
        with zero_bubble.deferred_weight_gradients() as work:
            model(input_ids=input_ids, position_ids=position_ids).square().mean().backward()
        linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert all(weight.grad is None for weight in linears)
        assert len(work) == len(linears) == 4 * LINEARS_PER_LAYER + 1
        assert {id(weight) for weight, *_ in work} == {id(weight) for weight in linears}  # each once
        assert zero_bubble.run_weight_gradients(work) == len(linears) and not work
    finally:
        zero_bubble.split_weight_gradients(model, on=False)
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, unsplit[name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("flags, expected", [
    (["--pp_size", "2", "--virtual_pp_size", "2"], "--virtual_pp_size 2 needs --pp_engine interleaved_1f1b"),
    (["--pp_engine", "interleaved_1f1b", "--virtual_pp_size", "2"], "--virtual_pp_size 2 needs --pp_size > 1"),
    (["--pp_size", "4", "--pp_engine", "interleaved_1f1b", "--virtual_pp_size", "2", "--gradient_accumulation_steps",
      "4"], "pp_size x virtual_pp_size = 8 chunks for 4 layers: each chunk needs at least one layer"),
    (["--pp_size", "2", "--pp_engine", "interleaved_1f1b", "--gradient_accumulation_steps", "3"],
     "--gradient_accumulation_steps 3 is not a multiple of --pp_size 2"),
])
def test_step14_bad_schedule_input_is_one_line(flags, expected, monkeypatch, capsys):
    train, utils = import_step("step14", "train", "utils")
    monkeypatch.setattr(sys, "argv", ["train.py", *flags])
    args = train.parse_args()
    with pytest.raises(SystemExit):
        train.check_command_line(args, utils.load_config(args), world_size=args.pp_size)
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert expected in error, error
