"""Checks steps 11 and 12's ZeRO from inside a 4-process run (dp 2 x cp 2: one dp x cp group of 4); writes JSON.

    python -m torch.distributed.run --standalone --nproc_per_node 4 tests/zero_check.py out.json

For zero stages 0, 1 and 2, in fp32 and bf16: a few optimizer steps (grad_acc 2) of the tiny model on random
tokens that differ on every rank. After every step it gathers every rank's parameters and records whether
they are bitwise identical across the group. It also records the most full fp32 gradient buffers of
ZeRO-2 alive at once during backward, the number of buckets, and how the optimizer's fp32 master is split
(each rank's owned elements, and whether the pieces tile the padded buckets). In fp32 it also trains what one
process would (every rank's micro-batches, the same AdamW) and records how far the gathered parameters are from
it after every step, element by element: a reduction wrong in the same way on every rank passes the comparison
across ranks, not this one.

Step 12's ZeRO-3, in fp32 and bf16 (and with tied embeddings in fp32), beside step 12's stage 2 on the same tokens: the losses of every step, the
most units whose full parameters exist at once (counted after every gather and free), how many are whole
after each step, and each unit's parameter piece against its padded size. tests/test_zero.py asserts on the
JSON.
"""
import argparse
import importlib
import json
import sys
from types import SimpleNamespace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "step11_zero"))
import process_group_manager as pgm  # noqa: E402
import sharded_bucket  # noqa: E402
import zero  # noqa: E402
import zero_optimizer  # noqa: E402
from model import Llama  # noqa: E402
from optimizer import decay_groups  # noqa: E402
from utils import load_config  # noqa: E402

STEPS, GRAD_ACC, SEQ = 3, 2, 16
ZERO_FILES = ("sharded_bucket", "zero", "zero_optimizer")


def step_zero(modules):
    return SimpleNamespace(ZeroDataParallel=modules["zero"].ZeroDataParallel,
                           ZeroAdamW=modules["zero_optimizer"].ZeroAdamW,
                           ShardedBucket=modules["sharded_bucket"].ShardedBucket, ZERO_STAGES=modules["zero"].ZERO_STAGES)


def load_step12_zero():
    """Step 12's ZeRO files beside step 11's (its other modules are step 11's): imported with step 12's folder
    first on the path, then step 11's modules put back under their names."""
    step11 = {name: sys.modules.pop(name) for name in ZERO_FILES}
    sys.path.insert(0, str(ROOT / "step12_fsdp"))
    try:
        return step_zero({name: importlib.import_module(name) for name in ZERO_FILES})
    finally:
        sys.path.pop(0)
        sys.modules.update(step11)


zero11 = step_zero({"sharded_bucket": sharded_bucket, "zero": zero, "zero_optimizer": zero_optimizer})
zero12 = load_step12_zero()


class ScaledLlama(torch.nn.Module):
    """The tiny Llama with 5 more parameters: their bucket (5 elements) needs padding to be cut in 4 pieces."""

    def __init__(self, config):
        super().__init__()
        self.llama = Llama(config)
        self.scale = torch.nn.Parameter(torch.ones(5))

    def forward(self, **kwargs):
        return self.llama(**kwargs) * self.scale.mean()


def tiny_config(num_hidden_layers):
    return load_config(argparse.Namespace(model_name=str(ROOT / "assets" / "tiny_llama"), seq_len=SEQ,
                                          num_hidden_layers=num_hidden_layers, num_attention_heads=None,
                                          num_key_value_heads=None))


def train_step(model, optimizer, config, generator):
    """One optimizer step of GRAD_ACC micro-batches of random tokens; returns this rank's summed loss."""
    model.zero_grad()
    total = 0.0
    for i in range(GRAD_ACC):
        model.require_backward_grad_sync = i == GRAD_ACC - 1
        tokens = torch.randint(0, config.vocab_size, (1, SEQ + 1), generator=generator)
        logits = model(input_ids=tokens[:, :-1], position_ids=torch.arange(SEQ)[None])  # [1, seq, vocab]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
        (loss / GRAD_ACC).backward()
        total += loss.item() / GRAD_ACC
    model.finish_gradient_synchronization()
    optimizer.step()
    model.finish_parameter_gathers()  # the caller compares the parameters across ranks
    return total


def one_process(config, steps):
    """The flat parameters after each of `steps` steps of one process that trains the same weights on every rank's
    tokens (its micro-batches drawn from each rank's generator in turn, the loss divided by the number of ranks as
    the averaging of the gradients divides it) with torch.optim.AdamW on the groups ZeroAdamW uses."""
    torch.manual_seed(0)
    model = ScaledLlama(config)
    optimizer = torch.optim.AdamW(decay_groups(model.parameters(), weight_decay=0.01), lr=1e-3)
    ranks = dist.get_world_size()
    generators = [torch.Generator().manual_seed(1 + rank) for rank in range(ranks)]
    after = []
    for _ in range(steps):
        optimizer.zero_grad()
        for _ in range(GRAD_ACC):
            for generator in generators:
                tokens = torch.randint(0, config.vocab_size, (1, SEQ + 1), generator=generator)
                logits = model(input_ids=tokens[:, :-1], position_ids=torch.arange(SEQ)[None])  # [1, seq, vocab]
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
                (loss / GRAD_ACC / ranks).backward()
        optimizer.step()
        after.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return after


def train(zero_stage, dtype, live_buffers):
    torch.manual_seed(0)  # the same initial weights on every rank
    config = tiny_config(num_hidden_layers=2)
    model = zero11.ZeroDataParallel(ScaledLlama(config).to(dtype), zero_stage=zero_stage, bucket_size_mb=0.5)
    optimizer = zero11.ZeroAdamW(model, lr=1e-3)
    generator = torch.Generator().manual_seed(1 + dist.get_rank())  # different tokens on every rank
    identical, from_one_process = [], []
    reference = one_process(config, STEPS) if dtype == torch.float32 else None
    for step in range(STEPS):
        train_step(model, optimizer, config, generator)
        mine = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine)
        identical.append(all(torch.equal(mine, other) for other in everyone))
        if reference is not None:
            from_one_process.append((mine - reference[step]).abs().max().item())
    return {"identical_after_each_step": identical, "max_abs_diff_from_one_process": from_one_process,
            "buckets": len(model.buckets),
            "owned": [bucket.master.numel() for bucket in model.buckets],
            "padded": [bucket.padded_numel for bucket in model.buckets],
            "max_live_full_grad_buffers": max(live_buffers, default=0),
            "grad_buffers_after_sync": sum(bucket.grad_buffer is not None for bucket in model.buckets)}


def train_fsdp(dtype, tied=False):
    """Step 12: stage 2 and stage 3, and step 11's stage 2, from the same weights on the same tokens (4 layers:
    6 units; with tied embeddings 5, the first being the embedding, the norm and the LM head)."""
    config = tiny_config(num_hidden_layers=4)
    config.tie_word_embeddings = tied
    models = {}
    for key, module, zero_stage in (("step11_zero2", zero11, 2), (2, zero12, 2), (3, zero12, 3)):
        torch.manual_seed(0)
        model = module.ZeroDataParallel(Llama(config).to(dtype), zero_stage=zero_stage, bucket_size_mb=0.5)
        models[key] = model, module.ZeroAdamW(model, lr=1e-3)
    units = models[3][0].buckets
    whole = lambda: sum(unit.param_buffer.untyped_storage().size() > 0 for unit in units)  # noqa: E731
    most_whole = [0]
    originals = {name: getattr(zero12.ShardedBucket, name) for name in ("gather_parameters", "free_parameters")}
    for name, original in originals.items():
        def counted(bucket, original=original):
            original(bucket)
            most_whole[0] = max(most_whole[0], whole())
        setattr(zero12.ShardedBucket, name, counted)
    losses = {key: [] for key in models}
    whole_after_step = []
    for zero_stage, (model, optimizer) in models.items():
        generator = torch.Generator().manual_seed(1 + dist.get_rank())
        for _ in range(STEPS):
            losses[zero_stage].append(train_step(model, optimizer, config, generator))
            if zero_stage == 3:
                whole_after_step.append(whole())
    for name, original in originals.items():
        setattr(zero12.ShardedBucket, name, original)
    return {"losses_zero2": losses[2], "losses_zero3": losses[3], "losses_step11_zero2": losses["step11_zero2"],
            "units": len(units),
            "most_units_whole_at_once": most_whole[0], "units_whole_after_each_step": whole_after_step,
            "param_shard": [unit.param_shard.numel() for unit in units], "padded": [unit.padded_numel for unit in units],
            "param_buffer_bytes_after_step": sum(unit.param_buffer.untyped_storage().size() for unit in units)}


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    pgm.setup_process_group_manager(tp_size=1, cp_size=2, pp_size=1, dp_size=2)
    live_buffers = []
    allocate = zero11.ShardedBucket.allocate_grad_buffer

    def counting_allocate(bucket):  # how many full fp32 gradient buffers exist while backward allocates one more
        allocate(bucket)
        live_buffers.append(sum(b.grad_buffer is not None for b in buckets_alive))

    buckets_alive = []
    zero11.ShardedBucket.allocate_grad_buffer = counting_allocate
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        for zero_stage in zero11.ZERO_STAGES:
            live_buffers.clear()
            original_init = zero11.ShardedBucket.__init__

            def tracking_init(bucket, *args, **kwargs):
                buckets_alive.append(bucket)
                original_init(bucket, *args, **kwargs)

            zero11.ShardedBucket.__init__ = tracking_init
            buckets_alive.clear()
            results[f"{str(dtype).split('.')[1]}_zero{zero_stage}"] = train(zero_stage, dtype, live_buffers)
            zero11.ShardedBucket.__init__ = original_init
        results[f"{str(dtype).split('.')[1]}_fsdp"] = train_fsdp(dtype)
    results["float32_fsdp_tied"] = train_fsdp(torch.float32, tied=True)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
