"""Durable writes: a file written under a temporary name, fsynced and renamed, so that after a crash or a power loss
it is absent or whole; the COMPLETE marker, written the same way once every file of a checkpoint is on the disk;
and the sha256 of a file's tensors that its metadata vouches for.
"""
import hashlib
import json
import os
import shutil

import torch
from safetensors.torch import save_file


COMPLETE = "COMPLETE"


def tensors_sha256(tensors):
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order: what a file's metadata vouches for."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(f"{key}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def fsync(path):
    """Flush a file's bytes, or a folder's entries (the names renamed into it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fresh_folder(checkpoint_dir):
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # left behind by a save killed before COMPLETE
    os.makedirs(checkpoint_dir)
    fsync(os.path.dirname(checkpoint_dir))


def write_durably(path, tensors, metadata):
    """Write under a temporary name, fsync, rename, fsync the folder: after a crash or a power loss the file is
    absent or whole, never there with missing bytes."""
    save_file(tensors, path + ".tmp", metadata={"json": json.dumps(metadata)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path + ".tmp", 0o666 & ~umask)  # safetensors writes 0600: the mode of every other file instead
    fsync(path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a reader sees no file or the whole file
    fsync(os.path.dirname(path))


def mark_complete(checkpoint_dir, step):
    """Only after every file is on the disk: COMPLETE, itself written durably."""
    fsync(checkpoint_dir)
    marker = os.path.join(checkpoint_dir, COMPLETE)
    with open(marker + ".tmp", "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(marker + ".tmp", marker)
    fsync(checkpoint_dir)
