"""What makes two ranks, or a run and its checkpoint, the same run: at start-up every rank compares its settings
with every other's (check_same_settings), and a checkpoint records the run it belongs to (run_settings) so that a
resume can say what differs (run_differences). Files are compared by their content, not by the path that names
them: a symlink or another node's mount point names the same tokenizer, dataset and weights.
"""
import functools
import hashlib
import json
import os

import torch.distributed as dist

from utils import fail

# Config keys that name, describe or serve generation, and never enter the math of a training step.
NOT_MATH = ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache",
            "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id", "problem_type",
            "chunk_size_feed_forward", "is_encoder_decoder", "pad_token_id", "bos_token_id", "eos_token_id")
# Flags that say where output goes, or how fast input is prepared: naturally different per node, the same math.
# (--save_dir is compared by what it is: save_dir.check_every_rank_sees.)
OUTPUT_ONLY = ("metrics_file", "run_name", "use_wandb", "num_workers", "num_proc", "omp_num_threads",
               "tokenizers_parallelism", "timeout_s", "peak_tflops", "save_dir")
# Flags that name files whose content enters the training: compared by that content.
BY_CONTENT = ("dataset_name", "init_from_hf")
# The files that turn text into token ids, in whichever of them a tokenizer comes.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")


@functools.lru_cache(maxsize=None)  # asked by the run's identity and by the settings check
def tokenizer_fingerprint(model_name):
    """sha256 of the tokenizer files of --model_name: the same whatever path names the directory (a symlink,
    another mount point). A hub name's files come from the Hugging Face cache (fetched first if need be, as the
    data loader would); where they cannot be had, the name stands for them."""
    directory = model_name
    if not os.path.isdir(directory):
        try:
            from huggingface_hub import snapshot_download
            directory = snapshot_download(model_name, allow_patterns=list(TOKENIZER_FILES))
        except Exception:  # offline and not cached, or an unknown name: loading the model says so later
            return f"name:{model_name}"
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                digest.update(name.encode() + b"\0" + hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def files_fingerprint(path):
    """sha256 of a local file or directory's files (their paths inside it and their bytes), the same whatever path
    names it; a hub name stands for its own content, and no path (None) for itself."""
    if path is None or not os.path.exists(path):
        return path and f"name:{path}"
    top = path if os.path.isdir(path) else os.path.dirname(path)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names)
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            digest.update(os.path.relpath(path, top).encode() + b"\0" + hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


def check_same_settings(args, config):
    """Every rank must train with the same settings, or the data-parallel copies silently drift apart (two
    machines started with different --seed, say). A collective at start-up compares what changes the training:
    every flag but the output-only ones, every config value that enters the model, and the tokenizer and the
    files that the BY_CONTENT flags name by their content, not by the path that names them (a symlink, another
    mount point on another node)."""
    settings = {**{f"--{name}": value for name, value in vars(args).items()
                   if name not in (*OUTPUT_ONLY, *BY_CONTENT, "model_name")},
                **{f"config.{name}": value for name, value in config.to_dict().items() if name not in NOT_MATH},
                "the tokenizer files of --model_name": tokenizer_fingerprint(args.model_name),
                **{f"the files of --{name}": files_fingerprint(getattr(args, name)) for name in BY_CONTENT}}
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


ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "tie_word_embeddings")
# A resume must match all of these, and every config value that enters the model: otherwise the weights or the
# data position would mean something else.
SAME_RUN = ("seq_len", "global_batch_size", "dataset", "seed", "tokenizer", *ARCHITECTURE)
# The optimizer's settings: a resume may change them (they apply from its first step on, and it says so).
SCHEDULE = ("learning_rate", "lr_scheduler_type", "warmup_steps", "max_grad_norm", "weight_decay")
RUN_KEYS = (*SAME_RUN, "learning_rate", "model_name", "config")


def run_settings(args, config):
    """What identifies this run (SAME_RUN and the config: the dataset and the tokenizer by their content), the
    optimizer's settings, and what an export needs (config, tokenizer)."""
    def where(name):  # a local directory by its real path, however it was spelled
        return os.path.realpath(name) if os.path.isdir(name) else name

    return {"seq_len": args.seq_len, "seed": args.seed, "dataset": files_fingerprint(args.dataset_name),
            "dataset_name": where(args.dataset_name),
            "global_batch_size": args.micro_batch_size * args.gradient_accumulation_steps * args.dp_size,
            "tokenizer": tokenizer_fingerprint(args.model_name), **{name: getattr(config, name) for name in ARCHITECTURE},
            **{name: getattr(args, name) for name in SCHEDULE}, "model_name": where(args.model_name),
            "config": config.to_dict()}


def run_differences(saved, run):
    """What differs between a checkpoint's run and this one, as 'name saved vs this' (empty for the same run)."""
    run = json.loads(json.dumps(run))  # as the checkpoint holds it: tuples as lists
    differing = [f"{name} {saved[name]!r} vs {run[name]!r}" for name in SAME_RUN if saved[name] != run[name]]
    config = run["config"]
    for key in sorted(set(saved["config"]) | set(config)):
        if key not in NOT_MATH and key not in SAME_RUN and saved["config"].get(key) != config.get(key):
            differing.append(f"config.{key} {saved['config'].get(key)!r} vs {config.get(key)!r}")
    return differing
