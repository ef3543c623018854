"""Step 15: mixture of experts and expert parallelism. A Mixtral config (--model_name assets/tiny_mixtral) makes
every MLP a sparse MoE block (moe.py), trained with transformers' load-balancing loss; --ep_size E spreads each
layer's experts over E data-parallel ranks, which send each token to its experts' rank and back (expert_parallel.py).

    torchrun --nproc_per_node 1 step15_expert_parallel/train.py --model_name assets/tiny_mixtral
    torchrun --nproc_per_node 2 step15_expert_parallel/train.py --model_name assets/tiny_mixtral --dp_size 2 \
        --ep_size 2
"""
import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

import process_group_manager as pgm
from checkpoint import load_checkpoint, save_checkpoint
from command_line import ArgumentParser, integer, non_negative_float, output_file, positive_float
from context_parallel import apply_context_parallel
from dataloader import DEFAULT_DATASET, MicroBatchDataLoader
from hf_weights import HFWeights
import expert_parallel
from expert_parallel import apply_expert_parallel, expert_errors
from metrics import to_readable_format
from model import RECOMPUTE, Llama, set_recompute
from moe import balance_loss, is_moe, moe_blocks
from optimizer import lr_scheduler, resolve_warmup_steps
from pipeline_parallel import PipelineParallel
from pipeline_schedules import ENGINES, schedule_errors
from progress import Progress
from process_group_manager import node_warning, setup_process_group_manager, validate_layout
from same_run import check_same_settings, run_settings
from save_dir import claim_save_dir
from scheduled_pipeline import train_step_pipeline
from tensor_parallel import apply_tensor_parallel
from utils import (DEFAULT_MODEL, average_loss_across_dp_cp_ranks, check_loss, close_distributed, fail,
                   init_distributed, load_config, peer_failures_end_the_run, resolve_device, resolve_dtype,
                   set_all_seed, warn)
from weights import SeededWeights, parameter_reader
from zero import ZERO_STAGES, ZeroDataParallel
from zero_optimizer import ZeroAdamW


def parse_args():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--omp_num_threads", type=integer(1), default=1)
    parser.add_argument("--tokenizers_parallelism", type=str, default="false")
    parser.add_argument("--model_name", type=str, default=DEFAULT_MODEL)
    parser.add_argument("--num_hidden_layers", type=integer(1), default=None, help="default: the model config's")
    parser.add_argument("--num_attention_heads", type=integer(1), default=None, help="default: the model config's")
    parser.add_argument("--num_key_value_heads", type=integer(1), default=None, help="default: the model config's")
    parser.add_argument("--dataset_name", type=str, default=DEFAULT_DATASET)
    parser.add_argument("--num_workers", type=integer(0), default=0, help="DataLoader worker processes")
    parser.add_argument("--num_proc", type=integer(1), default=1, help="processes for tokenizing the dataset")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--learning_rate", type=positive_float, default=1e-3, help="the peak learning rate")
    parser.add_argument("--lr_scheduler_type", choices=["constant", "cosine"], default="cosine",
                        help="after the warm-up: constant, or a cosine down to 10%% of the peak at the last step")
    parser.add_argument("--warmup_steps", type=integer(0), default=None,
                        help="steps of linear warm-up to the peak (default: a tenth of the run's steps)")
    parser.add_argument("--max_grad_norm", type=non_negative_float, default=1.0,
                        help="clip the global gradient L2 norm to this (0: no clipping)")
    parser.add_argument("--weight_decay", type=non_negative_float, default=0.1,
                        help="AdamW's decoupled weight decay, on the matrices only (not the norms' weights)")
    parser.add_argument("--seq_len", type=integer(1), default=128)
    parser.add_argument("--micro_batch_size", type=integer(1), default=4)
    parser.add_argument("--gradient_accumulation_steps", type=integer(1), default=2)
    parser.add_argument("--max_tokens", type=integer(1), default=102400, help="train until this many tokens were seen")
    parser.add_argument("--tp_size", type=integer(1), default=1)
    parser.add_argument("--dp_size", type=integer(1), default=1)
    parser.add_argument("--pp_size", type=integer(1), default=1)
    parser.add_argument("--cp_size", type=integer(1), default=1,
                        help="context parallel: ranks that split every sequence")
    parser.add_argument("--sequence_parallel", action="store_true",
                        help="outside the tensor-parallel matmuls each tp rank keeps 1/tp of the sequence "
                             "(tp_size > 1)")
    parser.add_argument("--recompute", choices=RECOMPUTE, default="none",
                        help="activations computed again in backward instead of kept: selective (the element-wise "
                             "work between matmuls) or full (every decoder layer from its input)")
    parser.add_argument("--ep_size", type=integer(1), default=1,
                        help="expert parallel: dp ranks that split every MoE layer's experts")
    parser.add_argument("--router_aux_loss_coef", type=non_negative_float, default=None,
                        help="the load-balancing loss's weight (default: the MoE model config's)")
    parser.add_argument("--pp_engine", choices=ENGINES, default="afab")
    parser.add_argument("--virtual_pp_size", type=integer(1), default=1, help="interleaved_1f1b: chunks per stage")
    parser.add_argument("--bucket_size_mb", type=positive_float, default=25, help="data-parallel gradient bucket size")
    parser.add_argument("--zero_stage", type=int, choices=ZERO_STAGES, default=0,
                        help="shard over the dp x cp ranks: 1 the fp32 master and AdamW moments, 2 the gradients too, "
                        "3 the parameters too (gathered one unit at a time; --bucket_size_mb is then unused)")
    parser.add_argument("--run_name", type=str, default="default_run")
    parser.add_argument("--use_wandb", action="store_true")
    parser.add_argument("--metrics_file", type=output_file, default=None, help="JSON Lines file, one object per step")
    parser.add_argument("--save_dir", type=str, default=None, help="write checkpoints here")
    parser.add_argument("--save_every", type=integer(0), default=None,
                        help="checkpoint every N steps (default 0: only at the end)")
    parser.add_argument("--keep_last", type=integer(1), default=None,
                        help="complete checkpoints kept in --save_dir (default 2)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in --save_dir, in this run's layout or another")
    parser.add_argument("--init_from_hf", type=str, default=None,
                        help="Hugging Face Llama directory (model.safetensors or an index) to start from")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--timeout_s", type=positive_float, default=600,
                        help="seconds a collective waits for a stalled peer before the run stops")
    parser.add_argument("--peak_tflops", type=positive_float, default=None, help="one device's peak, for MFU "
                        "(default: a known GPU's datasheet figure, or a short matmul measurement on a CPU)")
    return parser.parse_args()


def train_step(model, data_loader, device, aux_loss_coef=0.0):
    """One optimizer step's forward and backward passes: grad_acc_steps micro-batches whose
    gradients add up to the gradient of the mean loss over the whole batch. A mixture of experts adds aux_loss_coef
    x the load-balancing loss to each micro-batch's; then also returns that loss (the mean) and the (token, choice)
    pairs each expert of each layer took (None for a dense model)."""
    # Summed on the device (in float64, as a Python float would be): reading it is the step's one host sync.
    acc_loss = torch.zeros((), dtype=torch.float64, device=device)
    blocks = moe_blocks(model)
    acc_aux, load = torch.zeros_like(acc_loss), 0
    for i in range(data_loader.grad_acc_steps):
        # Data/context parallel: the micro-batches before the last only accumulate; the last one's backward
        # all-reduces the accumulated gradients.
        if pgm.process_group_manager.cp_dp_world_size > 1:
            model.require_backward_grad_sync = i == data_loader.grad_acc_steps - 1
        batch = next(data_loader)
        input_ids = batch["input_ids"].to(device)  # [batch, seq / cp]: this cp rank's tokens
        target_ids = batch["target_ids"].to(device)  # [batch, seq / cp]
        position_ids = batch["position_ids"].to(device)  # their positions in the whole sequence
        logits = model(input_ids=input_ids, position_ids=position_ids)  # [batch, seq / cp, vocab]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target_ids.reshape(-1))
        if blocks:
            aux = balance_loss(blocks)
            loss = loss + aux_loss_coef * aux
            acc_aux += aux.detach() / data_loader.grad_acc_steps
            load = load + torch.stack([block.router_stats[0] for block in blocks])  # [layers, experts]
        # Scale so the accumulated gradient is that of the mean over all micro-batches.
        loss = loss / data_loader.grad_acc_steps
        loss.backward()
        acc_loss += loss.detach()
    return acc_loss, (acc_aux, load) if blocks else None


def set_up_process(args):
    """This process's threads, device and dtype."""
    os.environ["OMP_NUM_THREADS"] = str(args.omp_num_threads)
    os.environ["TOKENIZERS_PARALLELISM"] = args.tokenizers_parallelism
    torch.set_num_threads(args.omp_num_threads)

    local_rank = pgm.launch().local_rank or 0
    device = resolve_device(args.device, local_rank)
    dtype = resolve_dtype(args.dtype, device)
    return device, dtype


def check_command_line(args, config, world_size):
    """Stop at a command line that cannot work, with one line naming every problem, before any rank waits
    for another; warn about a layout that works, but slowly, and about a zero stage with nothing to shard."""
    errors = validate_layout(world_size, args.tp_size, args.cp_size, args.pp_size, args.dp_size, config, args.seq_len)
    errors += sequence_parallel_errors(args)
    errors += schedule_errors(args, config.num_hidden_layers)
    errors += expert_errors(args, config)
    if not args.save_dir:  # without it these would be ignored: a run meant to be checkpointed would not be
        errors += [f"{flag} needs --save_dir" for flag in ("--resume", "--save_every", "--keep_last")
                   if getattr(args, flag[2:]) not in (None, False)]
    if errors:
        fail("; ".join(errors))
    if args.zero_stage > 0 and args.dp_size * args.cp_size == 1:
        warn(f"--zero_stage {args.zero_stage} with dp_size x cp_size = 1: there is no other rank to shard over, so "
             f"the run is stage 0")
        args.zero_stage = 0
    ranks_per_node = pgm.launch().local_world_size or world_size  # torchrun's --nproc_per_node
    warning = node_warning(args.tp_size, args.cp_size, ranks_per_node)
    if warning:
        warn(warning)


def sequence_parallel_errors(args):
    """--sequence_parallel needs something to split the sequence over, and equal parts: each rank's sequence (its
    share under context parallelism, seq_len / cp_size) is cut into tp_size contiguous parts."""
    if not args.sequence_parallel:
        return []
    if args.tp_size == 1:
        return ["--sequence_parallel needs --tp_size > 1: it splits the sequence over the tensor-parallel ranks"]
    chunk = args.seq_len // args.cp_size
    if chunk % args.tp_size:
        return [f"--sequence_parallel: each rank's sequence of {chunk} tokens (seq_len {args.seq_len} / cp_size "
                f"{args.cp_size}) is not divisible by tp_size {args.tp_size}"]
    return []


def build_model(args, config, device, dtype, initialise=True):
    """The model of this rank and its optimizer. No rank builds the whole model: it is built on the meta device
    (shapes, no memory), cut to this rank's tp shards and pipeline stage and wrapped for ZeRO, which allocates only
    what the rank keeps (at stage 3 its pieces); then initialise gives that its values, read a block at a time from
    the seed stream (bit for bit the full build of every earlier step) or from --init_from_hf's files (by slices).
    A resume passes initialise=False: load_checkpoint gives the values."""
    grid = pgm.process_group_manager
    set_all_seed(args.seed)
    with torch.device("meta"):
        model = Llama(config)
    shapes = {name: param.shape for name, param in model.named_parameters()}  # the full model's
    if grid.tp_world_size > 1:
        apply_tensor_parallel(model, args.sequence_parallel)  # this rank's shards (shapes still)
    set_recompute(model, args.recompute)
    if grid.cp_world_size > 1:
        apply_context_parallel(model)  # attention over the whole sequence, from this rank's share of the tokens
    if is_moe(config):
        apply_expert_parallel(model, args.sequence_parallel)  # this rank's experts, and who shares the tokens
    model = model.to(dtype=dtype)
    if grid.pp_world_size > 1:
        model = PipelineParallel(model, config, args.virtual_pp_size)  # only this stage's layers (its chunks)
    # fp32 gradient buckets, averaged over the dp x cp ranks, whole (stage 0) or sharded (stages 1 to 3), and at
    # stage 3 the parameters sharded too, each unit gathered only while it computes: allocated on the device
    model = ZeroDataParallel(model, zero_stage=args.zero_stage, bucket_size_mb=args.bucket_size_mb, device=device)
    if initialise:
        source = HFWeights(args.init_from_hf, shapes) if args.init_from_hf else SeededWeights(config, args.seed)
        model.load_parameters(parameter_reader(source, model), exact_master=False)
    # AdamW on the fp32 master pieces this rank owns, matrices decaying
    optimizer = ZeroAdamW(model, lr=args.learning_rate, weight_decay=args.weight_decay)
    return model, optimizer


def router_metrics(aux_loss, load):
    """What a mixture of experts logs each step: the balance loss (the mean over the dp x cp ranks), the (token,
    choice) pairs this rank's tokens sent to each expert of each layer, and the bytes the ranks of its ep group
    handed to all-to-all (expert_parallel.alltoall_bytes_per_rank: the mean and the busiest)."""
    mean, busiest = expert_parallel.alltoall_bytes_per_rank()
    return {"aux_loss": average_loss_across_dp_cp_ranks(aux_loss).item(), "tokens_per_expert": load.tolist(),
            "alltoall_bytes": mean, "alltoall_bytes_max": busiest}


def main():
    args = parse_args()
    device, dtype = set_up_process(args)
    config = load_config(args)
    world_size = pgm.launch().world_size
    check_command_line(args, config, world_size)
    run = run_settings(args, config)

    init_distributed(device, args.timeout_s)
    check_same_settings(args, config)
    # Global rank 0 locks --save_dir before any check of it, until save_dir_lock is closed at the end of the run.
    resume_from, save_dir_lock = claim_save_dir(args.save_dir, args.resume, run) if args.save_dir else (None, None)
    setup_process_group_manager(args.tp_size, args.cp_size, args.pp_size, args.dp_size, timeout_s=args.timeout_s,
                                ep_size=args.ep_size)
    grid = pgm.process_group_manager
    is_logging_rank = grid.tp_rank == 0 and grid.cp_rank == 0 and grid.dp_rank == 0 and grid.pp_is_last_stage

    # Loading and tokenizing uses no collective: a missing or too small dataset stops every rank alike.
    data_loader = MicroBatchDataLoader(micro_batch_size=args.micro_batch_size, seq_len=args.seq_len,
                                       dataset_name=args.dataset_name, tokenizer_name=args.model_name,
                                       grad_acc_steps=args.gradient_accumulation_steps, num_workers=args.num_workers,
                                       num_proc=args.num_proc, seed=args.seed)

    model, optimizer = build_model(args, config, device, dtype, initialise=resume_from is None)
    progress = Progress(args, config, model, data_loader, device, dtype, world_size) if is_logging_rank else None

    tokens_per_step = data_loader.global_batch_size * args.seq_len
    total_steps = math.ceil(args.max_tokens / tokens_per_step)
    warmup_steps = resolve_warmup_steps(args.warmup_steps, total_steps)
    # what one pipeline stage sends the next: this rank's part of the sequence (under sequence parallelism 1/tp of it)
    seq_part = args.seq_len // args.cp_size // (args.tp_size if args.sequence_parallel else 1)
    tensor_shapes = (args.micro_batch_size, seq_part, config.hidden_size)
    step, trained_tokens = 0, 0
    if resume_from:
        step, trained_tokens = load_checkpoint(resume_from, model=model, optimizer=optimizer, data_loader=data_loader)
        if is_logging_rank:
            print(f"resumed from step {step} ({to_readable_format(trained_tokens)} tokens) in {args.save_dir}", flush=True)
    scheduler = lr_scheduler(optimizer.optimizer, args.lr_scheduler_type, warmup_steps, total_steps, steps_done=step)
    while trained_tokens < args.max_tokens:
        step_start = time.time()
        model.zero_grad()  # the data-parallel wrapper's also empties its gradient buckets
        router = None  # a mixture of experts, without pipeline parallelism: (balance loss, tokens per expert)
        if grid.pp_world_size > 1:
            loss = train_step_pipeline(model, data_loader, engine=args.pp_engine, virtual_pp_size=args.virtual_pp_size,
                                       tensor_shapes=tensor_shapes, device=device, dtype=dtype)
        else:
            loss, router = train_step(model, data_loader, device, getattr(config, "router_aux_loss_coef", 0.0))
        model.finish_gradient_synchronization()  # waits for the buckets' reductions
        grad_norm = optimizer.clip_grad_norm(args.max_grad_norm)  # the norm before clipping
        lr = scheduler.get_last_lr()[0]  # this step's
        optimizer.step()  # then casts the master into the parameters (all-gathered at stages 1, 2; at stage 3
        # each unit is gathered by the next forward)
        scheduler.step()
        loss = average_loss_across_dp_cp_ranks(loss)
        loss, grad_norm = loss.item(), grad_norm.item()  # the step's one wait for the device
        moe = router_metrics(*router) if router else {}
        step_duration = time.time() - step_start
        step += 1
        trained_tokens += tokens_per_step
        check_loss(loss, step)

        if progress:
            progress.log_step(step, trained_tokens, step_duration, loss=loss, grad_norm=grad_norm, lr=lr, moe=moe)

        done = trained_tokens >= args.max_tokens
        if args.save_dir and (done or (args.save_every and step % args.save_every == 0)):
            model.finish_parameter_gathers()  # the parameters whole before they are read for the checkpoint
            save_checkpoint(save_dir=args.save_dir, step=step, tokens=trained_tokens, model=model, optimizer=optimizer,
                            data_loader=data_loader, run=run, keep_last=args.keep_last or 2)

    model.finish_parameter_gathers()  # no all-gather left in flight when the process group goes
    if progress:
        progress.close()
    close_distributed()
    if save_dir_lock:
        save_dir_lock.close()  # the run is over: --save_dir is free for the next one


if __name__ == "__main__":
    with peer_failures_end_the_run():
        main()
