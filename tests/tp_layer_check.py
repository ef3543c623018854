"""Layer-level checks of step4's tensor parallelism, run by tests/test_tensor_parallel.py as

    python -m torch.distributed.run --standalone --nproc_per_node N tests/tp_layer_check.py OUT.jsonl

Every rank builds the same full layer from one seed and shards a copy with step4's tensor_parallel; both
run forward and backward on the same input and output gradient. Each rank compares its shard's output
and gradients with the matching slice of the full layer's; rank 0 writes one JSON line per check with
the largest |difference| over all ranks and the largest |value| of the reference (for scale).
"""
import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import import_step  # noqa: E402

pgm, tp, model_module, optimizer = import_step("step4", "process_group_manager", "tensor_parallel", "model", "optimizer")

BATCH, SEQ, IN, OUT = 2, 5, 32, 48  # OUT and the vocabularies below divide by tp = 2 and 4


def local_block(full, local):
    """The block of `full` that this rank's `local` tensor stands for: the dim whose size differs is split."""
    for dim, (full_size, local_size) in enumerate(zip(full.shape, local.shape)):
        if full_size != local_size:
            return full.narrow(dim, pgm.process_group_manager.tp_rank * local_size, local_size)
    return full


def compare(full, local):
    """(max |difference|, max |reference|) of the local tensor against its block of the full one."""
    reference = local_block(full.detach(), local.detach())
    return (reference - local.detach()).abs().max().item(), reference.abs().max().item()


def leaf(x):
    return x.detach().clone().requires_grad_()


def check_column(results, gather_output):
    full = nn.Linear(IN, OUT, bias=not gather_output)
    layer = tp.ColumnParallelLinear(full, gather_output=gather_output)
    x = torch.randn(BATCH, SEQ, IN, requires_grad=True)
    x_tp = leaf(x)
    grad_out = torch.randn(BATCH, SEQ, OUT)
    y, y_tp = full(x), layer(x_tp)  # [batch, seq, out] and [batch, seq, out / tp] (out if gathered)
    y.backward(grad_out)
    y_tp.backward(local_block(grad_out, y_tp))
    name = "column_gathered" if gather_output else "column"
    results[f"{name}.output"] = compare(y, y_tp)
    results[f"{name}.input_grad"] = compare(x.grad, x_tp.grad)
    results[f"{name}.weight_grad"] = compare(full.weight.grad, layer.weight.grad)
    if full.bias is not None:
        results[f"{name}.bias_grad"] = compare(full.bias.grad, layer.bias.grad)


def check_row(results):
    full = nn.Linear(OUT, IN, bias=True)
    layer = tp.RowParallelLinear(full)
    x = torch.randn(BATCH, SEQ, OUT, requires_grad=True)
    grid = pgm.process_group_manager
    x_tp = leaf(x.chunk(grid.tp_world_size, dim=-1)[grid.tp_rank])  # the input arrives split
    grad_out = torch.randn(BATCH, SEQ, IN)
    y, y_tp = full(x), layer(x_tp)  # both [batch, seq, in]
    y.backward(grad_out)
    y_tp.backward(grad_out)
    results["row.output"] = compare(y, y_tp)
    results["row.input_grad"] = compare(x.grad, x_tp.grad)
    results["row.weight_grad"] = compare(full.weight.grad, layer.weight.grad)
    results["row.bias_grad"] = compare(full.bias.grad, layer.bias.grad)


def check_embedding(results):
    full = nn.Embedding(64, IN)
    layer = tp.VocabParallelEmbedding(full)
    input_ids = torch.randint(0, 64, (BATCH, 3 * SEQ))  # repeated ids included: their gradients add up
    grad_out = torch.randn(BATCH, 3 * SEQ, IN)
    y, y_tp = full(input_ids), layer(input_ids)  # both [batch, seq, hidden]
    y.backward(grad_out)
    y_tp.backward(grad_out)
    results["embedding.output"] = compare(y, y_tp)
    results["embedding.weight_grad"] = compare(full.weight.grad, layer.weight.grad)


def check_llama(results, tied):
    """The whole model, grouped-query attention included (8 heads, 4 kv heads): the weights each rank
    starts from, the logits, the loss and every parameter's gradient."""
    config = SimpleNamespace(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-5,
                             initializer_range=0.02, tie_word_embeddings=tied)
    full = model_module.Llama(config)
    sharded = tp.apply_tensor_parallel(copy.deepcopy(full))
    name = "llama_tied" if tied else "llama"
    if tied:
        shared = sharded.lm_head.weight is sharded.embed_tokens.weight
        results[f"{name}.lm_head_shares_embedding"] = (0.0 if shared else 1.0, 1.0)
    full_params, sharded_params = dict(full.named_parameters()), dict(sharded.named_parameters())
    assert full_params.keys() == sharded_params.keys(), (full_params.keys(), sharded_params.keys())
    results[f"{name}.init_weights"] = max(compare(full_params[n], sharded_params[n]) for n in full_params)

    input_ids = torch.randint(0, config.vocab_size, (BATCH, 3 * SEQ))
    target_ids = torch.randint(0, config.vocab_size, (BATCH, 3 * SEQ))
    losses, logits = [], []
    for model in (full, sharded):
        logits.append(model(input_ids))  # [batch, seq, vocab]
        losses.append(F.cross_entropy(logits[-1].reshape(-1, config.vocab_size), target_ids.reshape(-1)))
        losses[-1].backward()
    results[f"{name}.logits"] = compare(*logits)
    results[f"{name}.loss"] = compare(*losses)
    # The largest relative gradient error over all parameters: init-scale gradients are small.
    relative = [compare(full_params[n].grad, sharded_params[n].grad) for n in full_params]
    results[f"{name}.grad_relative"] = (max(d / r for d, r in relative), 1.0)
    check_global_norm(results, name, full, sharded)


def check_global_norm(results, name, full, sharded):
    """The global gradient norm of the sharded model (step 4's clip_grad_norm: shards summed over tp, a norm weight
    counted once) against the full model's, on every rank; what it would be if every tp rank counted the norm
    weights (so the test can tell); and the gradients after clipping to half the norm, against the full model's."""
    full_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in full.parameters()])).item()
    tp_sharded = tp.tp_sharded_parameters(sharded)
    replicated = sum(p.grad.pow(2).sum().item() for p in sharded.parameters() if p not in tp_sharded)
    norm = optimizer.clip_grad_norm(sharded, max_norm=full_norm / 2).item()
    results[f"{name}.grad_norm"] = (abs(norm - full_norm), full_norm)
    counted_tp_times = (norm**2 + (pgm.process_group_manager.tp_world_size - 1) * replicated) ** 0.5
    results[f"{name}.grad_norm_if_norm_weights_counted_tp_times"] = (abs(counted_tp_times - full_norm), full_norm)
    torch.nn.utils.clip_grad_norm_(full.parameters(), max_norm=full_norm / 2)
    full_params, sharded_params = dict(full.named_parameters()), dict(sharded.named_parameters())
    relative = [compare(full_params[n].grad, sharded_params[n].grad) for n in full_params]
    results[f"{name}.clipped_grad_relative"] = (max(d / r for d, r in relative), 1.0)


def main():
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    world_size = dist.get_world_size()
    pgm.setup_process_group_manager(world_size, 1, 1)
    torch.manual_seed(0)  # every rank: the same full layers, inputs and output gradients
    results = {}
    check_column(results, gather_output=False)
    check_column(results, gather_output=True)
    check_row(results)
    check_embedding(results)
    check_llama(results, tied=False)
    check_llama(results, tied=True)

    lines = []
    for name, (diff, scale) in results.items():
        diff = torch.tensor(diff)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        lines.append({"check": name, "tp": world_size, "max_abs_diff": diff.item(), "reference_max_abs": scale})
    if dist.get_rank() == 0:
        Path(out_path).write_text("".join(json.dumps(line) + "\n" for line in lines))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
