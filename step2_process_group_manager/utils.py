"""Helpers shared by train.py: the command line's checks, joining the process group, the checks that stop a bad
run, seeding, device/dtype choice, config loading, errors, formatting."""
import argparse
import contextlib
import datetime
import math
import os
import random
import re
import resource
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

# The embedded offline defaults (tools/make_assets.py makes them).
ASSETS = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets"))
DEFAULT_MODEL = os.path.join(ASSETS, "tiny_llama")


def fail(message, every_rank=False):
    """Stop this rank with one clear line. Most checks run on every rank and reach the same verdict:
    then only the first rank of each node prints (global rank 0; in a job of several torchrun agents, each
    shows its own node's output, so every node says why), and the others wait a moment so that its line is
    the one torchrun shows. A problem only some ranks see (every_rank=True) is printed by each of them."""
    rank = int(os.environ.get("RANK", "0"))
    if every_rank:
        print(f"error: [rank {rank}] {message}", file=sys.stderr, flush=True)
    elif int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(2)
    sys.exit(1)


def warn(message):
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose complaints (an unknown flag, a value of the wrong type or range) are one `error:` line
    from one rank, like every other check, instead of a usage text from every rank."""

    def error(self, message):
        fail(f"{message} (see --help)")


def integer(minimum):
    """An argparse type: an integer >= minimum."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def positive_float(text):
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


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
    if config.model_type != "llama":
        fail(f"model {args.model_name!r} is a {config.model_type!r} model; this tutorial builds Llama "
             f"(config model_type 'llama')")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":  # Llama 3's "llama3" scaling, for one
        fail(f"model {args.model_name!r} uses rope_type {rope_type!r}; this tutorial implements the default rotary "
             f"embedding only")
    for name in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
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


# Config keys that name, describe or serve generation, and never enter the math of a training step.
NOT_MATH = ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache",
            "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id", "problem_type",
            "chunk_size_feed_forward", "is_encoder_decoder", "pad_token_id", "bos_token_id", "eos_token_id")
# Flags that say how fast a rank runs: naturally different per node, the same math.
OUTPUT_ONLY = ("omp_num_threads", "tokenizers_parallelism", "timeout_s")


def init_distributed(device, timeout_s):
    """Join the job's process group. torchrun says in the environment where the peers are; a plain
    `python train.py` is a job of one process. A collective that waits more than timeout_s seconds for a peer
    fails, so a stalled rank ends the job instead of hanging it forever."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ:
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


def check_same_settings(args, config):
    """Every rank must train with the same settings, or the data-parallel copies silently drift apart (two
    machines started with different --seed, say). A collective at start-up compares what changes the training:
    every flag but the output-only ones, and the model by every config value that enters it, not by the path
    that names it (a symlink, another mount point on another node)."""
    settings = {**{f"--{name}": value for name, value in vars(args).items()
                   if name not in (*OUTPUT_ONLY, "model_name")},
                **{f"config.{name}": value for name, value in config.to_dict().items() if name not in NOT_MATH}}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, settings)
    differences = []
    for name in settings:
        ranks_by_value = {}
        for rank, other in enumerate(everyone):
            ranks_by_value.setdefault(repr(other.get(name)), []).append(rank)
        if len(ranks_by_value) > 1:
            values = ", ".join(f"{value} on ranks {ranks}" for value, ranks in ranks_by_value.items())
            differences.append(f"{name} {values}")
    if differences:
        fail("the ranks were started with different settings (every rank must run the same command): "
             + "; ".join(differences))


def check_loss(loss, step):
    """Stop at the first non-finite loss: every later step would only train on NaN."""
    if not math.isfinite(loss):
        fail(f"the loss is {loss} at step {step}: training diverged, so the run stops here (try a lower "
             f"--learning_rate)")


def close_distributed():
    dist.barrier()  # no rank tears down its connections while a peer still uses them
    dist.destroy_process_group()


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports kB


def to_readable_format(num, precision=2):
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(num) >= limit:
            return f"{num / limit:.{precision}f}{suffix}"
    return f"{num:.{precision}f}"
