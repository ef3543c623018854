"""The process grid: world_size = dp_size x pp_size x tp_size ranks laid out as grid[dp, pp, tp].

tp is the fastest-varying coordinate, so the ranks of one tensor-parallel group are neighbours
(on a GPU node: the GPUs joined by the fastest links), then pipeline stages, then data-parallel
replicas. Every rank belongs to exactly one tp group, one pp group and one dp group.

    import process_group_manager as pgm
    pgm.setup_process_group_manager(tp_size, pp_size, dp_size)
    pgm.process_group_manager.tp_rank, ...
"""
import datetime
import os

import torch.distributed as dist


def grid_coordinates(rank, tp_size, pp_size):
    """(dp_rank, pp_rank, tp_rank) of a global rank."""
    return rank // (pp_size * tp_size), (rank // tp_size) % pp_size, rank % tp_size


def grid_rank(dp_rank, pp_rank, tp_rank, tp_size, pp_size):
    return (dp_rank * pp_size + pp_rank) * tp_size + tp_rank


def grid_groups(tp_size, pp_size, dp_size):
    """Every tp, pp and dp group as a list of global ranks: the ranks that differ only in that coordinate."""
    def rank(d, p, t):
        return grid_rank(d, p, t, tp_size, pp_size)

    return {
        "tp": [[rank(d, p, t) for t in range(tp_size)] for d in range(dp_size) for p in range(pp_size)],
        "pp": [[rank(d, p, t) for p in range(pp_size)] for d in range(dp_size) for t in range(tp_size)],
        "dp": [[rank(d, p, t) for d in range(dp_size)] for p in range(pp_size) for t in range(tp_size)],
    }


def validate_layout(world_size, tp_size, pp_size, dp_size, config):
    """Reasons this layout cannot run (empty if it can). Pure, so every rank reaches the same verdict
    before the first collective. The command line has already refused sizes below 1."""
    errors = []
    if world_size != tp_size * pp_size * dp_size:
        errors.append(f"world size {world_size} != dp_size {dp_size} x pp_size {pp_size} x tp_size {tp_size} "
                      f"= {dp_size * pp_size * tp_size} (set torchrun --nproc_per_node to the product)")
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
    return errors


def node_warning(tp_size, ranks_per_node):
    """A layout that runs but runs slowly: torchrun gives each node ranks_per_node consecutive global ranks, so a
    tp group (consecutive ranks) stays inside one node only when tp_size divides ranks_per_node."""
    if ranks_per_node % tp_size:
        return (f"tensor-parallel groups of tp_size {tp_size} ranks span nodes of {ranks_per_node} ranks: their "
                f"all-reduces, two per layer forward and two backward, cross the network between machines instead "
                f"of the links inside one; choose a tp_size that divides the processes per node")
    return None


class ProcessGroupManager:
    def __init__(self, tp_size, pp_size, dp_size, timeout_s=None):
        self.global_rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.global_rank))
        self.dp_rank, self.pp_rank, self.tp_rank = grid_coordinates(self.global_rank, tp_size, pp_size)

        # Every rank must create every group, in the same order, even the ones it is not in. Subgroups do not
        # inherit the job's collective timeout (init_distributed's): without one they wait PyTorch's default.
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        groups = grid_groups(tp_size, pp_size, dp_size)
        self.tp_group, _ = dist.new_subgroups_by_enumeration(groups["tp"], timeout=timeout)
        self.pp_group, _ = dist.new_subgroups_by_enumeration(groups["pp"], timeout=timeout)
        self.dp_group, _ = dist.new_subgroups_by_enumeration(groups["dp"], timeout=timeout)
        self.tp_group_ids = next(g for g in groups["tp"] if self.global_rank in g)
        self.pp_group_ids = next(g for g in groups["pp"] if self.global_rank in g)
        self.dp_group_ids = next(g for g in groups["dp"] if self.global_rank in g)

        self.tp_world_size, self.pp_world_size, self.dp_world_size = tp_size, pp_size, dp_size
        self.pp_is_first_stage = self.pp_rank == 0
        self.pp_is_last_stage = self.pp_rank == pp_size - 1
        # Neighbouring stages (global ranks) for point-to-point sends; None at the ends of the pipeline.
        self.pp_prev_rank = None if self.pp_is_first_stage else self.pp_group_ids[self.pp_rank - 1]
        self.pp_next_rank = None if self.pp_is_last_stage else self.pp_group_ids[self.pp_rank + 1]

    def __str__(self):
        return f"DP({self.dp_rank})-PP({self.pp_rank})-TP({self.tp_rank})"


process_group_manager = None


def setup_process_group_manager(tp_size, pp_size, dp_size, timeout_s=None):
    global process_group_manager
    process_group_manager = ProcessGroupManager(tp_size, pp_size, dp_size, timeout_s)
