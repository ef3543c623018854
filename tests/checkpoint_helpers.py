"""Helpers of the checkpoint tests (tests/test_checkpoint_*.py, tests/test_fsdp.py): a folder's digest, an export
compared with transformers, and a save by one rank inside this process."""
import contextlib
import hashlib
import subprocess
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from conftest import ROOT, import_step, run_env


def tree_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def export_and_compare(save_dir, out_dir):
    """Export save_dir, load it with transformers, and compare its logits with our Llama holding the
    checkpoint's weights. Returns the transformers model."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "export_hf.py"), str(save_dir), str(out_dir)],
                          cwd=ROOT, env=run_env(out_dir.parent), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out_dir.iterdir()}
    hf_model = AutoModelForCausalLM.from_pretrained(out_dir)  # a Llama, or (step 15) a Mixtral

    # step 15's reader (the export's), which reads the checkpoints of steps 10 to 14 too
    checkpoint, model_module = import_step("step15", "checkpoint", "model")
    checkpoint_dir = checkpoint.complete_checkpoints(str(save_dir))[-1]
    config = dict(checkpoint.read_metadata(checkpoint_dir)["run"]["config"])
    ours = model_module.Llama(AutoConfig.for_model(config.pop("model_type"), **config))
    ours.load_hf_state_dict(checkpoint.read_full_tensors(checkpoint_dir, lambda key: key.startswith("model.")))
    input_ids = torch.randint(0, hf_model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (hf_model(input_ids).logits - ours(input_ids)).abs().max().item()
    print(f"export of {checkpoint_dir}: max |logits difference| {difference:.2e}")
    assert difference <= 1e-5
    return hf_model


@contextlib.contextmanager
def one_rank_run(step):
    """A tiny model after one optimizer step, in a process group of one (gloo) inside this process: yields
    (the step's checkpoint module, save(save_dir, step_number), the run's settings, the step's save_dir module
    with the guards and the damage checks, its durable.py with the writes and checksums), saving with the step's own
    save_checkpoint. A second or so, where a torchrun launch costs
    ten."""
    names = ("checkpoint", "save_dir", "durable", "same_run", "process_group_manager", "model",
             *(("zero", "zero_optimizer") if step != "step10" else ()))
    checkpoint, guards, durable, same_run, pgm, model_module, *zero = import_step(step, *names)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config.head_dim = 8
    args = SimpleNamespace(seq_len=16, seed=1, micro_batch_size=1, gradient_accumulation_steps=1, dp_size=1,
                           learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=None, max_grad_norm=1.0,
                           weight_decay=0.1, dataset_name=str(ROOT / "assets" / "tiny_stories"),
                           model_name=str(ROOT / "assets" / "tiny_llama"))
    run = same_run.run_settings(args, config)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        pgm.setup_process_group_manager(1, 1, 1, 1)
        torch.manual_seed(0)
        model = model_module.Llama(config)
        if zero:
            model = zero[0].ZeroDataParallel(model, zero_stage=0)
            optimizer = zero[1].ZeroAdamW(model, lr=1e-3)
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        input_ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
        model(input_ids=input_ids, position_ids=torch.arange(16)[None]).float().logsumexp(-1).mean().backward()
        if zero:
            model.finish_gradient_synchronization()
        optimizer.step()
        data_loader = SimpleNamespace(state_dict=lambda: {"epoch": 0, "sequences_consumed": 0})

        def save(save_dir, number):
            checkpoint.save_checkpoint(save_dir=str(save_dir), step=number, tokens=16 * number, model=model,
                                       optimizer=optimizer, data_loader=data_loader, run=run, keep_last=2)

        yield checkpoint, save, run, guards, durable
    finally:
        dist.destroy_process_group()
