"""The dataloader: chunk shapes, shifted targets, data-parallel shares of the global batch, epochs, the same
global batches in every split of it across epochs, and a resume that starts at its position directly."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT, import_step

TOKENIZER = str(ROOT / "assets" / "tiny_llama")


def make_loader(monkeypatch, dp_size, dp_rank, dataset, micro_batch_size, grad_acc_steps, seq_len=16, step="step5"):
    pgm, dataloader = import_step(step, "process_group_manager", "dataloader")
    grid = SimpleNamespace(dp_world_size=dp_size, dp_rank=dp_rank, global_rank=dp_rank, cp_world_size=1, cp_rank=0)
    monkeypatch.setattr(pgm, "process_group_manager", grid)
    return dataloader.MicroBatchDataLoader(micro_batch_size, seq_len, str(dataset), TOKENIZER, grad_acc_steps, seed=7)


def global_batches(loaders, num_micro_batches):
    """The chunks each rank sees, micro-batch by micro-batch."""
    return [[next(loader) for _ in range(num_micro_batches)] for loader in loaders]


def rows(tensor):
    return [tuple(row.tolist()) for row in tensor]


def test_chunks_targets_positions(monkeypatch):
    loader = make_loader(monkeypatch, 1, 0, ROOT / "assets" / "tiny_stories", micro_batch_size=3, grad_acc_steps=1)
    chunk = loader.tokenized_dataset[0]["input_ids"]
    assert chunk.shape == (17,)  # seq_len + 1
    batch = next(loader)
    assert batch["input_ids"].shape == batch["target_ids"].shape == batch["position_ids"].shape == (3, 16)
    assert torch.equal(batch["input_ids"][:, 1:], batch["target_ids"][:, :-1])  # targets are inputs shifted by one
    assert torch.equal(batch["position_ids"][1], torch.arange(16))
    # consecutive chunks share one token: the last target of chunk i is the first input of chunk i + 1
    first, second = loader.tokenized_dataset[0]["input_ids"], loader.tokenized_dataset[1]["input_ids"]
    assert first[-1] == second[0]
    # documents are separated by eos and the text decodes back to words of the corpus
    eos = loader.tokenizer.eos_token_id
    stream = np.concatenate([loader.tokenized_dataset[i]["input_ids"][:-1] for i in range(200)])
    assert (stream == eos).sum() >= 1
    assert len(loader.tokenizer.decode(stream[:50]).split()) > 10


@pytest.mark.parametrize("dp_size,micro_batch_size", [(2, 1), (2, 2), (4, 1)])
def test_dp_ranks_get_disjoint_shares_of_the_same_global_batch(monkeypatch, small_corpus, dp_size, micro_batch_size):
    grad_acc = 2
    baseline = make_loader(monkeypatch, 1, 0, small_corpus, micro_batch_size * dp_size, grad_acc)
    sharded = [make_loader(monkeypatch, dp_size, rank, small_corpus, micro_batch_size, grad_acc)
               for rank in range(dp_size)]
    assert baseline.global_batch_size == sharded[0].global_batch_size == micro_batch_size * dp_size * grad_acc
    for _ in range(3):  # three optimizer steps
        (base,) = global_batches([baseline], grad_acc)
        shares = global_batches(sharded, grad_acc)
        base_rows = sorted(r for mb in base for r in rows(mb["input_ids"]))
        share_rows = [r for rank in shares for mb in rank for r in rows(mb["input_ids"])]
        assert len(set(share_rows)) == len(share_rows)  # no chunk on two ranks
        assert sorted(share_rows) == base_rows  # together they are the single-process global batch


def test_new_epoch_instead_of_stop_iteration(monkeypatch, small_corpus, capsys):
    loader = make_loader(monkeypatch, 1, 0, small_corpus, micro_batch_size=4, grad_acc_steps=1)
    per_epoch = len(loader.tokenized_dataset) // 4
    assert 2 <= per_epoch <= 40  # small enough to reach the next epoch quickly
    first_epoch = [rows(next(loader)["input_ids"]) for _ in range(per_epoch)]
    assert loader.epoch == 0
    second_epoch = [rows(next(loader)["input_ids"]) for _ in range(per_epoch)]
    assert loader.epoch == 1
    assert "starting epoch 1" in capsys.readouterr().out
    # each epoch visits distinct chunks of the dataset (the remainder of a batch is dropped), reshuffled
    every_chunk = set(rows(torch.from_numpy(loader.tokenized_dataset[:]["input_ids"])[:, :-1]))
    for epoch in (first_epoch, second_epoch):
        seen = sum(epoch, [])
        assert len(set(seen)) == len(seen) == per_epoch * 4
        assert set(seen) <= every_chunk
    assert first_epoch != second_epoch


def test_dataset_smaller_than_a_global_batch_is_refused(monkeypatch, small_corpus, capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_loader(monkeypatch, 2, 0, small_corpus, micro_batch_size=64, grad_acc_steps=4)
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "fewer than one global batch" in error and "= 512" in error


# (dp_size, micro_batch_size, grad_acc_steps): four splits of one global batch of 8 sequences
SPLITS = [(1, 4, 2), (2, 2, 2), (4, 2, 1), (4, 1, 2)]


def step_batches(loaders, num_steps):
    """For each optimizer step, the sorted chunks of the global batch: every rank's grad_acc micro-batches."""
    steps = []
    for _ in range(num_steps):
        chunks = [row for loader in loaders for _ in range(loader.grad_acc_steps) for row in rows(next(loader)["input_ids"])]
        steps.append(sorted(chunks))
    return steps


def split_loaders(monkeypatch, dataset, split):
    dp_size, micro_batch_size, grad_acc = split
    return [make_loader(monkeypatch, dp_size, rank, dataset, micro_batch_size, grad_acc, step="step12")
            for rank in range(dp_size)]


def test_every_split_of_the_global_batch_trains_on_the_same_sequences_across_epochs(monkeypatch, small_corpus):
    """dp 1, 2 and 4, micro-batches of 1 to 4, accumulation 1 or 2: the same 8 sequences at every step, through
    three epoch boundaries (before, an epoch dropped the last N mod (micro_batch_size x dp) chunks, so the
    second epoch differed between splits)."""
    per_epoch = None
    seen = {}
    for split in SPLITS:
        loaders = split_loaders(monkeypatch, small_corpus, split)
        per_epoch = loaders[0].batch_sampler.global_batches_per_epoch
        assert 3 <= per_epoch <= 20 and len(loaders[0].tokenized_dataset) % 8 != 0  # a remainder to drop
        seen[split] = step_batches(loaders, 3 * per_epoch + 2)
        assert loaders[0].epoch == 3
    for split in SPLITS[1:]:
        assert seen[split] == seen[SPLITS[0]], split
    first = seen[SPLITS[0]]
    assert first[:per_epoch] != first[per_epoch:2 * per_epoch]  # reshuffled every epoch


def test_a_resume_that_reshards_just_before_an_epoch_boundary_continues_the_same_sequences(monkeypatch, small_corpus):
    """dp 2 stops one step before its epoch ends; dp 4, from that state, takes the next global batches (the last
    of the epoch, then the next epoch's) that dp 2 takes, and starts there directly: nothing is replayed."""
    source = split_loaders(monkeypatch, small_corpus, (2, 2, 2))
    per_epoch = source[0].batch_sampler.global_batches_per_epoch
    step_batches(source, per_epoch - 1)
    state = source[0].state_dict()
    assert state == {"epoch": 0, "sequences_in_epoch": (per_epoch - 1) * 8}
    target = split_loaders(monkeypatch, small_corpus, (4, 1, 2))
    for loader in target:
        loader.load_state_dict(state)
        assert loader._iterator._num_yielded == 0  # positioned by the sampler, not by drawing batches
    assert step_batches(target, 3) == step_batches(source, 3)
    assert target[0].epoch == source[0].epoch == 1
