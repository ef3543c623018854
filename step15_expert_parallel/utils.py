"""What the other files share: one-line errors and warnings, seeding, device/dtype choice, config loading, joining
the process group (and ending the run when a peer fails), the loss check and its average over the ranks. The command
line's types are in command_line.py, the metrics and MFU in metrics.py, the settings every rank must share in
same_run.py."""
import contextlib
import datetime
import math
import os
import random
import re
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import process_group_manager as pgm

# The embedded offline defaults (tools/make_assets.py makes them).
ASSETS = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets"))
DEFAULT_MODEL = os.path.join(ASSETS, "tiny_llama")


def fail(message, every_rank=False):
    """Stop this rank with one clear line. Most checks run on every rank and reach the same verdict:
    then only the first rank of each node prints (global rank 0; in a job of several torchrun agents, each
    shows its own node's output, so every node says why), and the others wait a moment so that its line is
    the one torchrun shows. A problem only some ranks see (every_rank=True) is printed by each of them."""
    ranks = pgm.launch()
    if every_rank:
        print(f"error: [rank {ranks.rank}] {message}", file=sys.stderr, flush=True)
    elif not ranks.local_rank:
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(2)
    sys.exit(1)


def warn(message):
    if pgm.launch().rank == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def set_all_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name, local_rank):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            fail("--device cuda was asked for but no CUDA device is available (use --device cpu)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_dtype(name, device):
    # bf16 on GPUs (tensor cores); fp32 on CPUs, where bf16 matmuls are slow and the parity checks run.
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "float16":  # a choice only to say why not: fp16 is what people try first
        fail("--dtype float16 is refused: fp16 overflows to inf and the loss turns NaN within a few steps unless the "
             "loss is scaled, which this tutorial does not do. --dtype bfloat16 has the same size and fp32's range")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_config(args):
    """The model config from a local directory or a hub name, with the command line's overrides."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(args.model_name)
    except (OSError, ValueError) as error:
        if os.path.isdir(args.model_name):
            fail(f"cannot load the model config in {args.model_name!r}: {error}")
        fail(f"cannot load model {args.model_name!r}: it is not a local directory and the Hugging Face hub "
             f"did not provide it (offline or unknown name). The embedded tiny model works offline: "
             f"--model_name {os.path.relpath(DEFAULT_MODEL)}")
    if config.model_type not in ("llama", "mixtral"):
        fail(f"model {args.model_name!r} is a {config.model_type!r} model; this step builds Llama and Mixtral "
             f"(config model_type 'llama' or 'mixtral')")
    if config.model_type == "mixtral" and (config.router_jitter_noise or config.sliding_window):
        fail(f"model {args.model_name!r} sets router_jitter_noise {config.router_jitter_noise} or sliding_window "
             f"{config.sliding_window}; this step implements neither (set them to 0 and null)")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":  # Llama 3's "llama3" scaling, for one
        fail(f"model {args.model_name!r} uses rope_type {rope_type!r}; this tutorial implements the default rotary "
             f"embedding only")
    for name in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "router_aux_loss_coef"):
        if getattr(args, name, None) is not None:
            setattr(config, name, getattr(args, name))
    if config.hidden_size % config.num_attention_heads != 0:
        fail(f"hidden_size {config.hidden_size} is not divisible by num_attention_heads {config.num_attention_heads}")
    if config.num_attention_heads % config.num_key_value_heads != 0:
        fail(f"num_attention_heads {config.num_attention_heads} is not divisible by "
             f"num_key_value_heads {config.num_key_value_heads}")
    config.head_dim = config.hidden_size // config.num_attention_heads
    if args.seq_len > config.max_position_embeddings:
        warn(f"--seq_len {args.seq_len} is longer than the model's max_position_embeddings "
             f"{config.max_position_embeddings}: allowed, because rotary embeddings have no position table and a "
             f"model trained from scratch learns these positions; pretrained weights never saw them")
    return config


def init_distributed(device, timeout_s):
    """Join the job's process group. torchrun says in the environment where the peers are; a plain
    `python train.py` is a job of one process. A collective that waits more than timeout_s seconds for a peer
    fails, so a stalled rank ends the job instead of hanging it forever."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if pgm.launch().by_torchrun:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout, store=dist.HashStore(), rank=0, world_size=1)


@contextlib.contextmanager
def peer_failures_end_the_run():
    """A collective that fails because a peer stalled past --timeout_s or died ends this rank with one line,
    not a traceback from deep inside the communication library. Other errors keep their traceback."""
    try:
        yield
    except RuntimeError as error:  # gloo raises a plain RuntimeError; NCCL and the store raise dist.DistError
        if not (isinstance(error, dist.DistError) or "gloo/transport" in str(error)):
            raise
        reason = re.sub(r"^\[[^\]]*\] *", "", str(error).splitlines()[0])  # drop gloo's [source file:line]
        fail(f"a collective failed: a peer rank stalled for longer than --timeout_s, or died ({reason})",
             every_rank=True)


def check_loss(loss, step):
    """Stop at the first non-finite loss: every later step would only train on NaN."""
    if not math.isfinite(loss):
        fail(f"the loss is {loss} at step {step}: training diverged, so the run stops here (try a lower "
             f"--learning_rate)")


def close_distributed():
    dist.barrier()  # no rank tears down its connections while a peer still uses them
    dist.destroy_process_group()


def average_loss_across_dp_cp_ranks(loss):
    """Mean of a 0-dim tensor over the data- and context-parallel ranks: each rank saw only its share of
    the global batch's sequences and of their tokens (equal shares, so the mean of means is the mean).
    float64 so that averaging adds no rounding of its own; SUM then divide (gloo has no AVG)."""
    grid = pgm.process_group_manager
    total = loss.to(torch.float64, copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=grid.cp_dp_group)
    if grid.pp_world_size > 1:
        # Only the last stage computes the loss; it sends the mean to the earlier stages, so that every rank
        # sees a non-finite loss and they all stop together.
        dist.broadcast(total, src=grid.pp_group_ids[-1], group=grid.pp_group)
    return total / grid.cp_dp_world_size
