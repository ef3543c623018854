"""Checkpoints and Hugging Face: the export of a step-10 checkpoint (tp 2 x pp 2) and of a step-11 ZeRO-2 one loads
in transformers with the same logits and loss, tied embeddings stay tied, and --init_from_hf starts at
transformers' loss in every layout (tied and sharded model files, step 12's ZeRO-3 included)."""
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from checkpoint_helpers import export_and_compare
from checkpoint_runs import SAVE_AT, halfway_copy
from conftest import ROOT, concurrently, import_step


def step10_loader(monkeypatch, model_dir, micro_batch_size, grad_acc):
    pgm, dataloader = import_step("step10", "process_group_manager", "dataloader")
    monkeypatch.setattr(pgm, "process_group_manager",
                        SimpleNamespace(dp_world_size=1, dp_rank=0, cp_world_size=1, global_rank=0))
    return dataloader.MicroBatchDataLoader(micro_batch_size=micro_batch_size, seq_len=32, grad_acc_steps=grad_acc,
                                           dataset_name=str(ROOT / "assets" / "tiny_stories"),
                                           tokenizer_name=str(model_dir), seed=42)


def transformers_loss(model, loader, grad_acc):
    """transformers' mean loss over the loader's next global batch."""
    losses = []
    with torch.no_grad():
        for _ in range(grad_acc):
            batch = next(loader)
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["target_ids"].reshape(-1)))
    return torch.stack(losses).mean().item()


def test_export_of_a_tp2_pp2_checkpoint_loads_in_transformers(full_runs, tmp_path, monkeypatch):
    full, save_dir = full_runs["tp2_pp2"]
    assert full.returncode == 0, full
    hf_model = export_and_compare(halfway_copy(save_dir, tmp_path / "ckpt"), tmp_path / "hf")
    assert hf_model.config.num_hidden_layers == 3 and not hf_model.config.tie_word_embeddings
    # transformers with the step-3 weights computes the loss the run logged at step 4, on the same data
    loader = step10_loader(monkeypatch, tmp_path / "hf", micro_batch_size=2, grad_acc=2)
    for _ in range(SAVE_AT * 2):
        next(loader)
    assert abs(transformers_loss(hf_model, loader, grad_acc=2) - full.losses[SAVE_AT]) <= 1e-5


def make_hf_checkpoint(folder, tied, shard):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "assets" / "tiny_llama" / name, folder / name)
    config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, tie_word_embeddings=tied)
    torch.manual_seed(3)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # non-trivial norms, so a misplaced norm weight would show in the loss
                param.add_(0.2 * torch.randn_like(param))
            if "embed_tokens" in name or "lm_head" in name:  # confident logits: a loss far from ln(vocab)
                param.mul_(10)
    model.save_pretrained(folder, max_shard_size="150KB" if shard else "5GB")
    return model


INIT_FROM_HF = {  # name: (nproc, layout, tied, sharded model files, step)
    "tp2_tied": (2, ["--tp_size", 2], True, True, "step10"),  # tied embeddings stay tied under tensor parallelism
    "pp2": (2, ["--pp_size", 2, "--pp_engine", "1f1b"], False, False, "step10"),
    # step 12 reads the files by slices, each rank its pieces of the (tied) units: the same global batch as above
    "step12_dp2_zero3_tied": (2, ["--micro_batch_size", 1, "--dp_size", 2, "--zero_stage", 3], True, True, "step12"),
}


@pytest.fixture(scope="module")
def init_from_hf_runs(torchrun, tmp_path_factory):
    """One step from transformers-made weights in each layout: name -> (run, transformers model, its dir, save_dir)."""
    def launch(name):
        nproc, layout, tied, shard, step = INIT_FROM_HF[name]
        model_dir, save_dir = tmp_path_factory.mktemp(f"hf_{name}"), tmp_path_factory.mktemp(f"ckpt_hf_{name}")
        model = make_hf_checkpoint(model_dir, tied=tied, shard=shard)
        run = torchrun(step, nproc, "--seq_len", 32, "--micro_batch_size", 2, "--gradient_accumulation_steps", 2,
                       "--max_tokens", 4 * 32, *layout, "--model_name", model_dir, "--init_from_hf", model_dir,
                       "--save_dir", save_dir)
        return name, (run, model, model_dir, save_dir)

    return dict(concurrently(launch, INIT_FROM_HF))


@pytest.mark.parametrize("name", INIT_FROM_HF)
def test_init_from_hf_starts_at_transformers_loss(init_from_hf_runs, monkeypatch, name):
    run, model, model_dir, _ = init_from_hf_runs[name]
    assert run.returncode == 0, run
    sharded = (model_dir / "model.safetensors.index.json").exists()
    assert sharded == INIT_FROM_HF[name][3] and len(list(model_dir.glob("model*.safetensors"))) >= (3 if sharded else 1)
    expected = transformers_loss(model, step10_loader(monkeypatch, model_dir, micro_batch_size=2, grad_acc=2), 2)
    assert abs(expected - 8.32) > 0.5  # far from a fresh model's ln(4096): the weights must have been loaded
    assert abs(run.losses[0] - expected) <= 1e-5, (run.losses[0], expected)


def test_export_keeps_tied_embeddings_tied(init_from_hf_runs, tmp_path):
    run, _, _, save_dir = init_from_hf_runs["tp2_tied"]
    assert run.returncode == 0, run
    hf_model = export_and_compare(save_dir, tmp_path / "hf")
    assert hf_model.config.tie_word_embeddings
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()


def test_export_of_a_zero_2_checkpoint_loads_in_transformers(zero_runs, tmp_path):
    full, save_dir = zero_runs["dp2_zero2"]
    assert full.returncode == 0, full
    export_and_compare(halfway_copy(save_dir, tmp_path / "ckpt"), tmp_path / "hf")
