"""Measuring helpers shared by the benchmarks: random batches shaped like the data loader's, the bytes of
activations autograd saves for backward, the most memory a process has held, the CPU's name, a free port."""
import platform
import resource
import socket
import subprocess
from pathlib import Path

import torch


class RandomBatches:
    """Stands in for MicroBatchDataLoader: the same batch keys, random tokens."""

    def __init__(self, micro_batch_size, seq_len, vocab_size, grad_acc_steps):
        self.shape, self.vocab_size, self.grad_acc_steps = (micro_batch_size, seq_len), vocab_size, grad_acc_steps
        self.generator = torch.Generator().manual_seed(0)

    def __next__(self):
        tokens = torch.randint(0, self.vocab_size, (self.shape[0], self.shape[1] + 1), generator=self.generator)
        return {"input_ids": tokens[:, :-1], "target_ids": tokens[:, 1:],
                "position_ids": torch.arange(self.shape[1]).expand(*self.shape)}


class ActivationMeter:
    """Live bytes of the tensors autograd saves for backward. A saved tensor is wrapped on the way in; the
    wrapper dies when autograd frees the saved tensor (after its backward), and takes its bytes off."""

    def __init__(self, parameters):
        self.weights = {p.untyped_storage().data_ptr() for p in parameters}
        self.storages = {}  # data_ptr -> number of live saved tensors viewing that storage
        self.live = self.peak = 0

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self.weights:
            return tensor
        return SavedTensor(self, tensor, storage.data_ptr(), storage.nbytes())

    @staticmethod
    def unpack(saved):
        return saved.tensor if isinstance(saved, SavedTensor) else saved

    def add(self, key, nbytes):
        if self.storages.get(key, 0) == 0:  # several saved views of one storage count once
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.storages[key] = self.storages.get(key, 0) + 1

    def remove(self, key, nbytes):
        self.storages[key] -= 1
        if self.storages[key] == 0:
            del self.storages[key]
            self.live -= nbytes


class SavedTensor:
    def __init__(self, meter, tensor, key, nbytes):
        self.meter, self.tensor, self.key, self.nbytes = meter, tensor, key, nbytes
        meter.add(key, nbytes)

    def __del__(self):
        self.meter.remove(self.key, self.nbytes)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_bytes():
    """The most memory this process has held since it started: its max RSS (Linux counts it in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_name():
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except FileNotFoundError:
        lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"
