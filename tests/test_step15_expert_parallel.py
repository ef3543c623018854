"""Step 15, mixture of experts and expert parallelism (`python -m pytest tests -k step15`):

- the model: our MoE Llama equals transformers' MixtralForCausalLM with the same weights (logits, top-1 and top-2,
  and the load-balancing loss), and reads Mixtral's weights in both formats (fused as transformers 5 holds them,
  one tensor per expert as save_pretrained writes them);
- expert parallelism trains the single-process MoE run (the parity contract, 20 steps): ep 2 alone, ep 4 with
  ZeRO-1, ep 2 with tp 2 + sequence parallelism + ZeRO-2, with cp 2 + ZeRO-1, with pp 2 (ZB-H1; the balance loss
  off, against one process with it off); the balance loss itself equal at every step (micro-batches of one
  sequence: the same micro-batches in every layout);
- an expert's gradient has one process's scale (the AdamW moments of every expert tensor after 10 steps, ep 2 vs one
  process), the (token, choice) pairs logged per expert add up, and the all-to-all bytes are the formula's exactly;
- a checkpoint saved at ep 2 resumes at ep 4 (ZeRO-2), and one process's exports as a Mixtral that transformers
  loads with the same logits;
- at parallel sizes 1, on the dense model, step 15 is step 14 bit for bit (the chain);
- bad input: experts that ep does not divide, ep that does not divide dp, ep on a dense model, ZeRO-3 with ep,
  the balance loss under pipeline parallelism.
The speed against transformers and the tokens-per-expert picture are tools/benchmark_moe.py's."""
import json
import sys

import pytest
import torch
import transformers

from checkpoint_helpers import export_and_compare
from conftest import ROOT, assert_parity, import_step, max_abs_diff
from test_step14_pipeline_schedules import EIGHT, SHORT
from test_zero import COMMON

MIXTRAL = ROOT / "assets" / "tiny_mixtral"
# two of the tiny Mixtral's four layers, micro-batches of one sequence (so every layout's micro-batches hold the same
# tokens: the balance loss is a statistic of one micro-batch), a global batch of 4
MOE = ["--model_name", MIXTRAL, "--num_hidden_layers", 2, "--micro_batch_size", 1]
EP2 = ["--gradient_accumulation_steps", 2, "--dp_size", 2, "--ep_size", 2]
NO_AUX = ["--router_aux_loss_coef", 0]
LAYOUTS = {
    "ep2": (2, *EP2),
    "ep4_zero1": (4, "--gradient_accumulation_steps", 1, "--dp_size", 4, "--ep_size", 4, "--zero_stage", 1),
    "ep2_tp2_sp_zero2": (4, *EP2, "--tp_size", 2, "--sequence_parallel", "--zero_stage", 2),
    "ep2_cp2_zero1": (4, *EP2, "--cp_size", 2, "--zero_stage", 1),
}
SAVE_AT = 10


@pytest.fixture(scope="module")
def runs(torchrun, tmp_path_factory):
    """Every launch of this module, two at a time. "one" and "ep2" save at steps 10 and 20; "resumed", the last
    launch, resumes a copy of ep2's save_dir as a run stopped after step 10 leaves it, at ep 4 with ZeRO-2. The two
    runs of the chain (8 layers, dense) run under VERBOSE=1 as step 14's module launches them: its step-14 run is
    that module's, when both run in one session."""
    folder = tmp_path_factory.mktemp("step15_checkpoints")
    saves = {name: folder / name for name in ("one", "ep2")}
    halfway = folder / "halfway"
    save = ["--save_every", SAVE_AT, "--save_dir"]
    launches = {"one": ("step15", 1, *COMMON, *MOE, "--gradient_accumulation_steps", 4, *save, saves["one"]),
                "ep2": ("step15", 2, *COMMON, *MOE, *EP2, *save, saves["ep2"]),
                **{name: ("step15", nproc, *COMMON, *MOE, *args) for name, (nproc, *args) in LAYOUTS.items()
                   if name != "ep2"},
                "one_no_aux": ("step15", 1, *COMMON, *MOE, *NO_AUX, "--gradient_accumulation_steps", 4),
                "ep2_pp2_zb": ("step15", 4, *COMMON, *MOE, *NO_AUX, *EP2, "--pp_size", 2, "--pp_engine", "zb_h1"),
                "step15_one_eight": ("step15", 1, *COMMON, *EIGHT, *SHORT),
                "step14_one_eight": ("step14", 1, *COMMON, *EIGHT, *SHORT),
                "resumed": ("step15", 4, *COMMON, *MOE, "--gradient_accumulation_steps", 1, "--dp_size", 4,
                            "--ep_size", 4, "--zero_stage", 2, "--save_dir", halfway, "--resume")}
    runs = torchrun.many_then_resume(launches, saver="ep2", save_dir=saves["ep2"], halfway=halfway, drop="step_000020",
                                     env_of=lambda name: {"VERBOSE": "1"} if name.endswith("one_eight") else None)
    return {**runs, "saves": saves}


def tiny_mixtral(layers=2, top_k=2):
    config = transformers.AutoConfig.from_pretrained(MIXTRAL)
    config.num_hidden_layers, config.num_experts_per_tok = layers, top_k
    return config


@pytest.mark.parametrize("top_k", [1, 2])
def test_step15_model_equals_transformers_mixtral(top_k):
    """Our model holding MixtralForCausalLM's weights (its state dict, fused experts): the same logits, and the same
    load-balancing loss as transformers' aux_loss."""
    model_module, moe = import_step("step15", "model", "moe")
    config = tiny_mixtral(top_k=top_k)
    torch.manual_seed(0)
    hf_model = transformers.MixtralForCausalLM(config).eval()
    ours = model_module.Llama(config).eval()
    ours.load_hf_state_dict(hf_model.state_dict())
    input_ids = torch.randint(0, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(input_ids, output_router_logits=True)
        logits = ours(input_ids)
        aux = moe.balance_loss(moe.moe_blocks(ours))
    assert (logits - expected.logits).abs().max().item() <= 1e-5
    assert aux.item() == pytest.approx(expected.aux_loss.item(), rel=1e-6)
    assert aux.item() > 1.0  # E * sum f * P is k for a perfectly even router: the check compares something real


def test_step15_reads_both_mixtral_formats(tmp_path):
    """--init_from_hf's reader gives every tensor as transformers holds it, from save_pretrained's files (one tensor
    per expert and matrix) and from a file of the fused tensors alike; load_hf_state_dict takes both too."""
    from safetensors.torch import save_file
    hf_weights, model_module = import_step("step15", "hf_weights", "model")
    config = tiny_mixtral()
    torch.manual_seed(0)
    hf_model = transformers.MixtralForCausalLM(config)
    state = {name.removeprefix("model."): tensor for name, tensor in hf_model.state_dict().items()}
    hf_model.save_pretrained(tmp_path / "original")
    (tmp_path / "fused").mkdir()
    save_file({name: t.contiguous() for name, t in hf_model.state_dict().items()}, tmp_path / "fused" / "model.safetensors")
    shapes = {name: tensor.shape for name, tensor in state.items()}
    for folder in ("original", "fused"):
        source = hf_weights.HFWeights(str(tmp_path / folder), shapes)
        for name, tensor in state.items():
            flat = tensor.reshape(tensor.shape[0], -1)
            assert list(source.shape(name)) == list(tensor.shape), (folder, name)
            left = 3 if flat.shape[1] > 3 else 0  # a block that starts inside the rows and columns
            block = source.read_block(name, (1, tensor.shape[0]), (left, flat.shape[1]))
            assert torch.equal(block, flat[1:, left:].float()), (folder, name)
    from safetensors.torch import load_file
    ours = model_module.Llama(config)
    ours.load_hf_state_dict(load_file(tmp_path / "original" / "model.safetensors"))
    assert torch.equal(ours.layers[1].mlp.experts.gate_up_proj, state["layers.1.mlp.experts.gate_up_proj"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_step15_expert_parallel_matches_one_process(runs, layout):
    """The parity contract against one process of the same MoE model, and the balance loss at every step."""
    run, one = runs[layout], runs["one"]
    assert_parity(run, one, steps=20)
    aux, expected = [m["aux_loss"] for m in run.metrics], [m["aux_loss"] for m in one.metrics]
    assert max_abs_diff(aux, expected) <= 1e-5, (aux, expected)
    assert min(expected) > 1.0


def test_step15_expert_parallel_composes_with_the_pipeline(runs):
    """ep 2 x pp 2 (ZB-H1) without the balance loss (refused across stages, see the bad input) equals one process
    without it."""
    assert_parity(runs["ep2_pp2_zb"], runs["one_no_aux"], steps=20)


def test_step15_expert_gradients_have_one_process_scale(runs):
    """An expert's gradient sums what the tokens of every rank contribute: after 10 steps the AdamW moments of every
    expert tensor (a running mean of the clipped gradients) at ep 2 are one process's. Twice the gradient (a sum
    not divided by dp) or half of it would move them by 100% or 50%."""
    checkpoint = import_step("step15", "checkpoint")
    moments = {}
    for name in ("one", "ep2"):
        assert runs[name].returncode == 0, runs[name]
        folder = checkpoint.complete_checkpoints(str(runs["saves"][name]))[0]
        assert folder.endswith(f"step_{SAVE_AT:06d}")
        moments[name] = checkpoint.read_full_tensors(folder, lambda key: key.startswith("exp_avg.") and "expert" in key)
    assert len(moments["one"]) == 2 * 2  # gate_up_proj and down_proj of 2 layers
    for key, expected in moments["one"].items():
        got = moments["ep2"][key]
        assert got.shape == expected.shape == (8, *expected.shape[1:]), key
        assert (got - expected).abs().max() <= 1e-3 * expected.abs().max(), key


def test_step15_logs_tokens_per_expert_and_the_alltoall_bytes_of_the_formula(runs):
    """Every step logs the (token, choice) pairs each expert of each layer took (they add up to tokens x k per layer)
    and the bytes each rank handed to all-to-all: per layer and micro-batch 4 x tokens x k x hidden x 4 bytes (fp32
    dispatch and combine, forward and backward) and the counts, 8 experts x 8 bytes, once: exactly, as the mean over
    the ranks of an ep group (one rank's bytes depend on how many pairs its experts received)."""
    one, ep2 = runs["one"], runs["ep2"]
    for run, micro_batches in ((one, 4), (ep2, 2)):
        assert run.returncode == 0, run
        for metrics in run.metrics:
            assert [sum(layer) for layer in metrics["tokens_per_expert"]] == [micro_batches * 32 * 2] * 2
    assert {m["alltoall_bytes"] for m in one.metrics} == {0}
    formula = 2 * 2 * (4 * 32 * 2 * 256 * 4 + 8 * 8)  # layers x micro-batches x (tokens, counts)
    assert {m["alltoall_bytes"] for m in ep2.metrics} == {formula}  # the mean over the ep group's ranks
    busiest = [m["alltoall_bytes_max"] for m in ep2.metrics]  # the rank whose experts took more pairs
    assert all(formula <= most <= 2 * formula for most in busiest) and max(busiest) > formula, busiest


def test_step15_a_checkpoint_reshards_across_ep_sizes(runs):
    """Saved at step 10 of 20 at ep 2 (ZeRO-0: the two ranks of the ep group each write their experts), resumed at
    ep 4 with ZeRO-2: the resumed steps are the uninterrupted run's."""
    whole, resumed = runs["ep2"], runs["resumed"]
    assert whole.returncode == 0, whole
    assert resumed.returncode == 0, resumed
    assert "resumed from step 10" in resumed.stdout, resumed.stdout[-2000:]
    assert len(resumed.losses) == 10
    assert max_abs_diff(resumed.losses, whole.losses[10:]) <= 1e-5, (resumed.losses, whole.losses)
    assert resumed.grad_norms == pytest.approx(whole.grad_norms[10:], rel=1e-4)


def test_step15_exports_a_mixtral_that_transformers_loads(runs, tmp_path):
    """tools/export_hf.py writes the MoE run's checkpoint in Mixtral's format: transformers loads it as a
    MixtralForCausalLM with our logits."""
    assert runs["one"].returncode == 0, runs["one"]
    hf_model = export_and_compare(runs["saves"]["one"], tmp_path / "hf")
    assert type(hf_model).__name__ == "MixtralForCausalLM"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_local_experts"] == 8


def test_step15_at_parallel_sizes_1_is_step_14_bit_for_bit(runs):
    step14, step15 = runs["step14_one_eight"], runs["step15_one_eight"]
    assert step14.returncode == 0 and step15.returncode == 0, (step14, step15)
    assert len(step15.losses) == 10 and step15.losses == step14.losses  # identical floats


@pytest.mark.parametrize("flags, expected", [
    (["--model_name", str(MIXTRAL), "--dp_size", "3", "--ep_size", "3"],
     "num_local_experts 8 is not divisible by --ep_size 3"),
    (["--model_name", str(MIXTRAL), "--dp_size", "2", "--ep_size", "4"], "--ep_size 4 does not divide dp_size 2"),
    (["--dp_size", "2", "--ep_size", "2"], "--ep_size 2 needs a mixture-of-experts model"),
    (["--model_name", str(MIXTRAL), "--dp_size", "2", "--ep_size", "2", "--zero_stage", "3"],
     "--zero_stage 3 with --ep_size > 1"),
    (["--model_name", str(MIXTRAL), "--pp_size", "2"], "pass --router_aux_loss_coef 0"),
])
def test_step15_bad_expert_input_is_one_line(flags, expected, monkeypatch, capsys):
    train, utils = import_step("step15", "train", "utils")
    monkeypatch.setattr(sys, "argv", ["train.py", *flags])
    args = train.parse_args()
    with pytest.raises(SystemExit):
        train.check_command_line(args, utils.load_config(args), world_size=args.dp_size * args.pp_size)
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert expected in error, error
