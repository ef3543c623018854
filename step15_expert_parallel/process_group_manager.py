"""The process grid: world_size = dp_size x pp_size x cp_size x tp_size ranks laid out as grid[dp, pp, cp, tp].

tp is the fastest-varying coordinate, so the ranks of one tensor-parallel group are neighbours
(on a GPU node: the GPUs joined by the fastest links), then context-parallel ranks (they exchange
keys and values in every attention layer, the next heaviest traffic), then pipeline stages, then
data-parallel replicas. Every rank belongs to exactly one tp, cp, pp and dp group, and to one cp_dp
group: the dp x cp ranks that hold the same weights and average their gradients.

Expert parallelism (step 15, ep_size E) splits the dp group, it adds no coordinate: consecutive dp ranks form ep
groups of E ranks (ep_rank = dp_rank % E), which spread the experts between them and exchange tokens; the ep_dp
group is the dp x cp ranks that hold the same experts (the same ep_rank), over which the experts' gradients reduce.

    import process_group_manager as pgm
    pgm.setup_process_group_manager(tp_size, cp_size, pp_size, dp_size)
    pgm.process_group_manager.tp_rank, ...
"""
import datetime
import os
from typing import NamedTuple

import torch.distributed as dist

# torch 2.13 renamed these two collectives (the old names warn); earlier releases have only the old names. ZeRO's
# buckets and sequence parallelism both use them.
reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def grid_coordinates(rank, tp_size, cp_size, pp_size):
    """(dp_rank, pp_rank, cp_rank, tp_rank) of a global rank."""
    return (rank // (pp_size * cp_size * tp_size), (rank // (cp_size * tp_size)) % pp_size,
            (rank // tp_size) % cp_size, rank % tp_size)


def grid_rank(dp_rank, pp_rank, cp_rank, tp_rank, tp_size, cp_size, pp_size):
    return ((dp_rank * pp_size + pp_rank) * cp_size + cp_rank) * tp_size + tp_rank


def grid_groups(tp_size, cp_size, pp_size, dp_size, ep_size=1):
    """Every tp, cp, pp, dp and cp_dp group as a list of global ranks: the ranks that differ only in those
    coordinates; and the ep and ep_dp groups (see the module docstring)."""
    def rank(d, p, c, t):
        return grid_rank(d, p, c, t, tp_size, cp_size, pp_size)

    D, P, C, T = range(dp_size), range(pp_size), range(cp_size), range(tp_size)
    return {
        "tp": [[rank(d, p, c, t) for t in T] for d in D for p in P for c in C],
        "cp": [[rank(d, p, c, t) for c in C] for d in D for p in P for t in T],
        "pp": [[rank(d, p, c, t) for p in P] for d in D for c in C for t in T],
        "dp": [[rank(d, p, c, t) for d in D] for p in P for c in C for t in T],
        "cp_dp": [[rank(d, p, c, t) for d in D for c in C] for p in P for t in T],
        "ep": [[rank(d, p, c, t) for d in range(b, b + ep_size)]
               for b in range(0, dp_size, ep_size) for p in P for c in C for t in T],
        "ep_dp": [[rank(d, p, c, t) for d in range(e, dp_size, ep_size) for c in C]
                  for e in range(ep_size) for p in P for t in T],
    }


def validate_layout(world_size, tp_size, cp_size, pp_size, dp_size, config, seq_len):
    """Reasons this layout cannot run (empty if it can). Pure, so every rank reaches the same verdict
    before the first collective. The command line has already refused sizes below 1."""
    errors = []
    if world_size != tp_size * cp_size * pp_size * dp_size:
        errors.append(f"world size {world_size} != dp_size {dp_size} x pp_size {pp_size} x cp_size {cp_size} x "
                      f"tp_size {tp_size} = {dp_size * pp_size * cp_size * tp_size} "
                      f"(set torchrun --nproc_per_node to the product)")
    # The load-balanced split cuts every sequence into 2 x cp_size equal chunks.
    if seq_len % (2 * cp_size) != 0:
        errors.append(f"seq_len {seq_len} is not divisible by 2 x cp_size = {2 * cp_size}")
    if config.num_attention_heads % tp_size != 0:
        errors.append(f"num_attention_heads {config.num_attention_heads} is not divisible by tp_size {tp_size}")
    if config.num_key_value_heads % tp_size != 0:
        errors.append(f"num_key_value_heads {config.num_key_value_heads} is not divisible by tp_size {tp_size}")
    # Tensor parallelism also splits the MLP's intermediate features and the vocabulary into equal shards.
    if config.intermediate_size % tp_size != 0:
        errors.append(f"intermediate_size {config.intermediate_size} is not divisible by tp_size {tp_size}")
    if config.vocab_size % tp_size != 0:
        errors.append(f"vocab_size {config.vocab_size} is not divisible by tp_size {tp_size}")
    if pp_size > config.num_hidden_layers:
        errors.append(f"pp_size {pp_size} is larger than num_hidden_layers {config.num_hidden_layers}: "
                      f"every pipeline stage needs at least one layer")
    if pp_size > 1 and getattr(config, "tie_word_embeddings", False):
        errors.append(f"tie_word_embeddings is not supported with pp_size {pp_size}: the tied weight would live on "
                      f"both the first stage (embedding) and the last (lm_head)")
    return errors


def node_warning(tp_size, cp_size, ranks_per_node):
    """A layout that runs but runs slowly: torchrun gives each node ranks_per_node consecutive global ranks, so a
    tp group (consecutive ranks) stays inside one node only when tp_size divides ranks_per_node, and a cp ring
    (tp-strided ranks within a block of tp_size x cp_size) only when tp_size x cp_size does."""
    if ranks_per_node % tp_size:
        return (f"tensor-parallel groups of tp_size {tp_size} ranks span nodes of {ranks_per_node} ranks: their "
                f"all-reduces, two per layer forward and two backward, cross the network between machines instead "
                f"of the links inside one; choose a tp_size that divides the processes per node")
    if ranks_per_node % (tp_size * cp_size):
        return (f"context-parallel rings (tp_size x cp_size = {tp_size * cp_size} ranks) span nodes of "
                f"{ranks_per_node} ranks: every attention layer's key/value hops cross the network between "
                f"machines; choose tp_size x cp_size that divides the processes per node")
    return None


class Launch(NamedTuple):
    """What the launcher (torchrun) tells this process; a plain `python train.py` is rank 0 of 1."""
    rank: int
    local_rank: int | None  # None: not set (a process group started another way numbers its ranks itself)
    world_size: int
    local_world_size: int | None  # torchrun's --nproc_per_node: the ranks on this node (None: not set)
    by_torchrun: bool


def launch():
    """The one place that reads RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE."""
    env = os.environ
    world_size = int(env.get("WORLD_SIZE", "1"))
    return Launch(rank=int(env.get("RANK", "0")),
                  local_rank=int(env["LOCAL_RANK"]) if "LOCAL_RANK" in env else None, world_size=world_size,
                  local_world_size=int(env["LOCAL_WORLD_SIZE"]) if "LOCAL_WORLD_SIZE" in env else None,
                  by_torchrun="RANK" in env)


class ProcessGroupManager:
    def __init__(self, tp_size, cp_size, pp_size, dp_size, timeout_s=None, ep_size=1):
        self.global_rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = launch().local_rank
        if self.local_rank is None:
            self.local_rank = self.global_rank
        self.dp_rank, self.pp_rank, self.cp_rank, self.tp_rank = grid_coordinates(self.global_rank, tp_size, cp_size,
                                                                                  pp_size)

        # Every rank must create every group, in the same order, even the ones it is not in. Subgroups do not
        # inherit the job's collective timeout (init_distributed's): without one they wait PyTorch's default.
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        groups = grid_groups(tp_size, cp_size, pp_size, dp_size, ep_size)
        self.tp_group, _ = dist.new_subgroups_by_enumeration(groups["tp"], timeout=timeout)
        self.cp_group, _ = dist.new_subgroups_by_enumeration(groups["cp"], timeout=timeout)
        self.pp_group, _ = dist.new_subgroups_by_enumeration(groups["pp"], timeout=timeout)
        self.dp_group, _ = dist.new_subgroups_by_enumeration(groups["dp"], timeout=timeout)
        self.cp_dp_group, _ = dist.new_subgroups_by_enumeration(groups["cp_dp"], timeout=timeout)
        self.ep_group = self.ep_dp_group = None  # ep_size 1: every rank holds every expert
        if ep_size > 1:
            self.ep_group, _ = dist.new_subgroups_by_enumeration(groups["ep"], timeout=timeout)
            self.ep_dp_group, _ = dist.new_subgroups_by_enumeration(groups["ep_dp"], timeout=timeout)
        self.ep_world_size, self.ep_rank = ep_size, self.dp_rank % ep_size
        self.ep_dp_world_size = cp_size * dp_size // ep_size
        self.tp_group_ids = next(g for g in groups["tp"] if self.global_rank in g)
        self.cp_group_ids = next(g for g in groups["cp"] if self.global_rank in g)
        self.pp_group_ids = next(g for g in groups["pp"] if self.global_rank in g)
        self.dp_group_ids = next(g for g in groups["dp"] if self.global_rank in g)

        self.tp_world_size, self.cp_world_size, self.pp_world_size, self.dp_world_size = (tp_size, cp_size, pp_size,
                                                                                          dp_size)
        self.cp_dp_world_size = cp_size * dp_size
        # The context-parallel ring (global ranks): key/value blocks go to the next cp rank and come from the previous.
        self.cp_send_rank = self.cp_group_ids[(self.cp_rank + 1) % cp_size]
        self.cp_recv_rank = self.cp_group_ids[(self.cp_rank - 1) % cp_size]
        self.pp_is_first_stage = self.pp_rank == 0
        self.pp_is_last_stage = self.pp_rank == pp_size - 1
        # Neighbouring stages (global ranks) for point-to-point sends; None at the ends of the pipeline.
        self.pp_prev_rank = None if self.pp_is_first_stage else self.pp_group_ids[self.pp_rank - 1]
        self.pp_next_rank = None if self.pp_is_last_stage else self.pp_group_ids[self.pp_rank + 1]

    def __str__(self):
        return f"DP({self.dp_rank})-PP({self.pp_rank})-CP({self.cp_rank})-TP({self.tp_rank})"


process_group_manager = None


def setup_process_group_manager(tp_size, cp_size, pp_size, dp_size, timeout_s=None, ep_size=1):
    global process_group_manager
    process_group_manager = ProcessGroupManager(tp_size, cp_size, pp_size, dp_size, timeout_s, ep_size)
