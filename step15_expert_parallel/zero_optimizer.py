"""ZeroAdamW (see zero.py): AdamW on the fp32 master pieces this rank owns, the global gradient norm from every
rank's pieces, and the moments a checkpoint keeps.
"""
from typing import NamedTuple

import torch
import torch.distributed as dist

import process_group_manager as pgm
from optimizer import decays, sum_of_squares
from sharded_bucket import ShardedBucket
from tensor_parallel import tp_sharded_parameters


class OwnedPiece(NamedTuple):
    """The elements of one parameter inside the piece of a bucket that this rank owns."""
    bucket: ShardedBucket
    piece: slice  # where they sit in the owned piece
    master: torch.Tensor  # the fp32 master's view of them: what AdamW updates
    decays: bool  # a matrix's elements, not a norm weight's
    counted: bool  # this rank counts them in the global gradient norm (a norm weight: tp rank 0 only)


class ZeroAdamW:
    """torch.optim.AdamW on the fp32 master pieces this rank owns, cut at its parameters' boundaries: a view of the
    master per parameter that overlaps the owned piece, in the decay group if the parameter is a matrix (AdamW is
    elementwise, so each view is updated exactly as its parameter's elements would be). clip_grad_norm, before the
    step, finds the global gradient norm from the owned fp32 gradient pieces and scales them; after the step the
    master is cast into the compute parameters and, under ZeRO-1/2, every rank's updated piece is all-gathered
    (waited for by the next forward, bucket by bucket; under ZeRO-3 the next forward gathers each unit when it
    needs it)."""

    def __init__(self, model, lr, weight_decay=0.01):
        grid = pgm.process_group_manager
        self.buckets = model.buckets
        tp_sharded = tp_sharded_parameters(model)
        self.pieces = [OwnedPiece(bucket, piece, bucket.master[piece], decays=decays(param),
                                  counted=param in tp_sharded or grid.tp_rank == 0)
                       for bucket in self.buckets for param, _, _, piece in bucket.owned_pieces()]
        self.optimizer = torch.optim.AdamW(
            [{"params": [p.master for p in self.pieces if p.decays], "weight_decay": weight_decay},
             {"params": [p.master for p in self.pieces if not p.decays], "weight_decay": 0.0}], lr=lr)

    def clip_grad_norm(self, max_norm):
        """The global L2 norm of the averaged gradients, before clipping, and the clip (max_norm > 0): every owned
        fp32 gradient piece scaled by max_norm / (norm + 1e-6) if that is below 1, before AdamW sees it. Each element
        of the model's gradient is counted once: this rank adds the squares of the pieces it owns (padding belongs
        to none), summed over the dp x cp group (stages 1 to 3: the pieces are disjoint; stage 0: every rank owns
        all, nothing to add), then over tp (shards; a norm weight is counted by tp rank 0 only) and pp (stages)."""
        grid = pgm.process_group_manager
        device = self.buckets[0].master.device
        grads = [piece.bucket.owned_grad()[piece.piece] for piece in self.pieces
                 if piece.counted and not piece.bucket.holds_experts]
        squares = sum_of_squares(grads, device)
        if self.buckets[0].shards_optimizer_state:
            dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=grid.cp_dp_group)
        if grid.ep_world_size > 1:  # experts (step 15): each rank of an ep group holds others
            experts = sum_of_squares([piece.bucket.owned_grad()[piece.piece] for piece in self.pieces
                                      if piece.counted and piece.bucket.holds_experts], device)
            # sharded (stages 1, 2): every piece of every expert owned by one rank of the dp x cp group; stage 0:
            # the ranks holding the same experts hold the same gradient, so sum over one ep group
            sharded = self.buckets[0].stage.shards_optimizer_state
            dist.all_reduce(experts, op=dist.ReduceOp.SUM, group=grid.cp_dp_group if sharded else grid.ep_group)
            squares += experts
        if grid.tp_world_size > 1:
            dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=grid.tp_group)
        if grid.pp_world_size > 1:
            dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=grid.pp_group)
        norm = squares.sqrt().float()
        if max_norm > 0:
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for bucket in self.buckets:
                bucket.owned_grad().mul_(scale)
        return norm

    def step(self):
        for piece in self.pieces:
            piece.master.grad = piece.bucket.owned_grad()[piece.piece]
        self.optimizer.step()
        # In the order the next forward needs them: the buckets were made in backward's order (last layer first),
        # and a group runs its collectives in the order they start, so the embedding's gather goes first.
        for bucket in reversed(self.buckets):
            bucket.publish_update()
        for piece in self.pieces:
            piece.master.grad = None

    def owned_state(self, bucket):
        """The AdamW moments of the bucket's owned piece, flat (zeros where no parameter is: the padding), and the
        step count: what a checkpoint keeps."""
        flat = {kind: torch.zeros_like(bucket.master) for kind in ("exp_avg", "exp_avg_sq")}
        step = torch.zeros(())
        for piece in self.pieces:
            state = self.optimizer.state.get(piece.master)
            if piece.bucket is bucket and state:
                for kind in flat:
                    flat[kind][piece.piece] = state[kind]
                step = state["step"]
        return flat["exp_avg"], flat["exp_avg_sq"], step

    def load_owned_state(self, bucket, exp_avg, exp_avg_sq, step):
        """The inverse of owned_state: each piece's moments from the flat ones."""
        for piece in self.pieces:
            if piece.bucket is bucket:
                self.optimizer.state[piece.master] = {"step": step.clone(), "exp_avg": exp_avg[piece.piece].clone(),
                                                      "exp_avg_sq": exp_avg_sq[piece.piece].clone()}
