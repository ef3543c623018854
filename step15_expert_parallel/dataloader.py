"""Tokenize a text dataset into fixed-length chunks and serve micro-batches to each data-parallel rank.

Every optimizer step consumes one global batch of micro_batch_size x grad_acc_steps x dp_size chunks. An
epoch is one shuffled order of the N chunks cut into N // global_batch_size global batches (the last N mod
global_batch_size chunks wait for another epoch's order), and GlobalBatchSampler deals each dp rank its share
of every global batch. So the global batches, across epochs too, are the same in every layout with the same
global batch size, however it is split into micro-batches, accumulation steps and dp ranks. The ranks of a cp
group draw the same sequences and each keeps its share of their tokens.
"""
import hashlib
import os

import numpy as np
import pyarrow.compute
import torch
from filelock import FileLock
from torch.utils.data import DataLoader

import process_group_manager as pgm
from context_parallel import split_batch_for_context_parallel
from utils import ASSETS, fail

DEFAULT_DATASET = os.path.join(ASSETS, "tiny_stories")


def load_text_dataset(dataset_name, split="train"):
    """A dataset with a column "text" of strings: one document per row."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(dataset_name, split=split)
    except Exception as error:  # datasets raises many types: FileNotFoundError, ConnectionError, DatasetNotFoundError...
        if os.path.isdir(dataset_name):
            files = [os.path.join(folder, name) for folder, _, names in os.walk(dataset_name) for name in names]
            if files and all(os.path.getsize(path) == 0 for path in files):
                fail(f"the dataset in {dataset_name!r} has no rows: its data files are empty")
            fail(f"cannot load the dataset in {dataset_name!r}: {type(error).__name__}: {error}")
        fail(f"cannot load dataset {dataset_name!r}: it is not a local directory and the Hugging Face hub did "
             f"not provide it (offline or unknown name). The embedded tiny corpus works offline: "
             f"--dataset_name {os.path.relpath(DEFAULT_DATASET)}")
    text = dataset.features.get("text")
    if text is None:
        fail(f"dataset {dataset_name!r} has no 'text' column to train on (its columns: {dataset.column_names})")
    if getattr(text, "dtype", None) not in ("string", "large_string"):
        fail(f"the 'text' column of dataset {dataset_name!r} holds {text}, not strings")
    missing = dataset.data.column("text").null_count  # Arrow counts the nulls without reading the rows
    if missing:
        first = pyarrow.compute.index(pyarrow.compute.is_null(dataset.data.column("text")), True).as_py()
        fail(f"{missing} rows of dataset {dataset_name!r} have no text (null), the first is row {first}: "
             f"drop or fill them")
    return dataset


def load_tokenizer(name):
    from transformers import AutoTokenizer

    tokenizer_files = ("tokenizer.json", "tokenizer.model", "vocab.json")
    if os.path.isdir(name) and not any(os.path.exists(os.path.join(name, file)) for file in tokenizer_files):
        fail(f"the model directory {name!r} has no tokenizer (none of {', '.join(tokenizer_files)}): the "
             f"tokenizer is read from --model_name")
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        fail(f"cannot load the tokenizer of {name!r}: {error}")


def group_into_chunks(token_lists, seq_len):
    """Concatenate documents and cut the stream into chunks of seq_len + 1 tokens. Consecutive chunks
    overlap by one token, so every token is a prediction target exactly once."""
    stream = np.concatenate(token_lists)
    num_chunks = (len(stream) - 1) // seq_len
    return [stream[i * seq_len: i * seq_len + seq_len + 1] for i in range(num_chunks)]


class GlobalBatchSampler:
    """The micro-batches (lists of chunk indices) of one dp rank, epoch after epoch, without end. Epoch e shuffles
    the N chunks with seed + e and cuts the order into N // G global batches of G = micro_batch_size x
    grad_acc_steps x dp_size chunks; the last N mod G wait for another epoch's order. Micro-batch m of global
    batch b gives dp rank r the positions b G + (m x micro_batch_size + i) x dp_size + r of the order
    (i < micro_batch_size): the ranks' micro-batches together are the global batch, whatever the split."""

    def __init__(self, num_chunks, micro_batch_size, grad_acc_steps, dp_size, dp_rank, seed):
        self.num_chunks, self.seed = num_chunks, seed
        self.micro_batch_size, self.grad_acc_steps = micro_batch_size, grad_acc_steps
        self.dp_size, self.dp_rank = dp_size, dp_rank
        self.global_batch_size = micro_batch_size * grad_acc_steps * dp_size
        self.global_batches_per_epoch = num_chunks // self.global_batch_size
        self.start = (0, 0)  # the (epoch, global batch) an iteration begins at

    def __iter__(self):
        epoch, first_batch = self.start
        while True:
            order = torch.randperm(self.num_chunks, generator=torch.Generator().manual_seed(self.seed + epoch))
            for batch in range(first_batch, self.global_batches_per_epoch):
                global_batch = order[batch * self.global_batch_size:(batch + 1) * self.global_batch_size]
                for micro_batch in range(self.grad_acc_steps):
                    start = micro_batch * self.micro_batch_size * self.dp_size + self.dp_rank
                    yield global_batch[start:start + self.micro_batch_size * self.dp_size:self.dp_size].tolist()
            epoch, first_batch = epoch + 1, 0


class MicroBatchDataLoader(DataLoader):
    def __init__(self, micro_batch_size, seq_len, dataset_name, tokenizer_name, grad_acc_steps,
                 num_workers=0, num_proc=1, seed=42, split="train"):
        self.grad_acc_steps = grad_acc_steps
        dp_size, dp_rank = pgm.process_group_manager.dp_world_size, pgm.process_group_manager.dp_rank
        self.global_batch_size = micro_batch_size * grad_acc_steps * dp_size

        self.tokenizer = load_tokenizer(tokenizer_name)
        dataset = load_text_dataset(dataset_name, split)
        self.tokenized_dataset = self.tokenize_dataset(dataset, seq_len, num_proc)
        if len(self.tokenized_dataset) < self.global_batch_size:
            fail(f"dataset {dataset_name!r} has {len(self.tokenized_dataset)} chunks of seq_len+1 = {seq_len + 1} "
                 f"tokens, fewer than one global batch (micro_batch_size {micro_batch_size} x "
                 f"gradient_accumulation_steps {grad_acc_steps} x dp_size {dp_size} = {self.global_batch_size})")

        # Data parallel: within every global batch dp rank r takes the chunks r, r + dp_size, r + 2 dp_size, ...,
        # so the dp ranks' micro-batches together are the global batch, and every rank's epoch has the same length.
        sampler = GlobalBatchSampler(len(self.tokenized_dataset), micro_batch_size, grad_acc_steps,
                                     dp_size=dp_size, dp_rank=dp_rank, seed=seed)
        super().__init__(self.tokenized_dataset, batch_sampler=sampler, collate_fn=self.collate_batch,
                         num_workers=num_workers)
        self.epoch = 0
        self.micro_batches_in_epoch = 0  # with the epoch, the data position a checkpoint saves
        self.micro_batches_per_epoch = sampler.global_batches_per_epoch * grad_acc_steps
        self._iterator = super().__iter__()

    def tokenize_dataset(self, dataset, seq_len, num_proc):
        tokenizer = self.tokenizer
        eos = np.array([tokenizer.eos_token_id], dtype=np.int64)

        def tokenize_and_chunk(batch):
            token_lists = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
            # eos after every document tells the model where one story ends and the next begins
            token_lists = [np.concatenate([np.asarray(ids, dtype=np.int64), eos]) for ids in token_lists]
            return {"input_ids": group_into_chunks(token_lists, seq_len)}

        # An explicit fingerprint (data + tokenizer + seq_len) makes the datasets cache hit on every later
        # run and on every other rank, instead of hashing the closure above.
        vocab = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else str(sorted(tokenizer.get_vocab().items()))
        fingerprint = hashlib.sha256(f"{dataset._fingerprint}|{vocab}|{seq_len}|chunks-v1".encode()).hexdigest()[:32]
        # One process per machine tokenizes; the others wait on the lock and then read its cache.
        cache_dir = os.path.dirname(dataset.cache_files[0]["filename"]) if dataset.cache_files else "."
        with FileLock(os.path.join(cache_dir, f"tokenize-{fingerprint}.lock")):
            chunks = dataset.map(tokenize_and_chunk, batched=True, batch_size=1000, num_proc=num_proc if num_proc > 1 else None,
                                 remove_columns=dataset.column_names, new_fingerprint=fingerprint,
                                 desc="Tokenizing and chunking")
        return chunks.with_format("numpy")

    # Static: each DataLoader worker process receives collate_fn pickled, and a bound method would take the
    # whole loader along, with the previous epoch's iterator, which cannot be pickled (spawned workers).
    @staticmethod
    def collate_batch(chunks):
        tokens = torch.from_numpy(np.stack([chunk["input_ids"] for chunk in chunks]))  # [batch, seq + 1]
        batch, seq = tokens.shape[0], tokens.shape[1] - 1
        return {
            "input_ids": tokens[:, :-1],  # [batch, seq]
            "target_ids": tokens[:, 1:],  # [batch, seq]: the next token of every position
            "position_ids": torch.arange(seq).expand(batch, seq),
        }

    def __iter__(self):
        return self  # an endless stream of micro-batches: the sampler never ends

    def __next__(self):
        if self.micro_batches_in_epoch == self.micro_batches_per_epoch:
            # Out of data: the sampler goes round again in a new order rather than ending the run.
            self.epoch += 1
            self.micro_batches_in_epoch = 0
            if pgm.process_group_manager.global_rank == 0:
                print(f"Dataloader: end of data, starting epoch {self.epoch}", flush=True)
        self.micro_batches_in_epoch += 1
        # Split here, in the training process: collate_batch may run in DataLoader worker processes
        # (--num_workers), and a spawned worker has no process grid.
        return split_batch_for_context_parallel(next(self._iterator))  # [batch, seq / cp] each

    def state_dict(self):
        """The data position in global terms, so that it carries over to another layout: the epoch and the
        sequences of it consumed, whole global batches (a checkpoint is taken between optimizer steps)."""
        return {"epoch": self.epoch,
                "sequences_in_epoch": self.micro_batches_in_epoch // self.grad_acc_steps * self.global_batch_size}

    def load_state_dict(self, state):
        """Continue where a checkpointed run stopped, in any split of the same global batch: the sampler starts
        at the saved epoch and global batch directly, nothing is replayed."""
        global_batches, leftover = divmod(state["sequences_in_epoch"], self.global_batch_size)
        if leftover:  # a checkpoint of this code always stops between global batches
            fail(f"the checkpoint stopped {state['sequences_in_epoch']} sequences into epoch {state['epoch']}, not a "
                 f"whole number of global batches of {self.global_batch_size} sequences: it was saved after an epoch "
                 f"ended inside an optimizer step, which only earlier versions of this loader did")
        self.epoch = state["epoch"]
        self.micro_batches_in_epoch = global_batches * self.grad_acc_steps
        self.batch_sampler.start = (self.epoch, global_batches)
        self._iterator = super().__iter__()
