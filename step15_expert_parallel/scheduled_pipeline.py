"""Run a pipeline schedule from its table (pipeline_schedules.timetable): interleaved 1F1B and zb_h1.

Step 8's 1F1B pairs each send with a receive by hand, phase by phase. With chunks going round the ranks, and W
passes in between, that bookkeeping grows with every schedule; so here the table decides. Every rank computes
the same simulation of the whole pipeline, in which every tensor crosses between two stages at a known time, and
walks its own list of events in time order:

    ("exchange", sends, receives)  post them together (one batch_isend_irecv), wait for none of them yet
    ("pass", F | B | W)             wait for the receive it needs, then compute

The sender's and the receiver's exchange of a tensor are posted at the same point of both ranks' walks, so they
match in order whatever the backend; a pass waits only for a tensor the simulation had ready before the pass
began. Sends are waited for at the end of the step. The data-parallel wrapper reduces the gradients once, after
the last pass (ZeroDataParallel.defer_reduction): micro-batches and chunks interleave too finely for its
per-backward counting.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

import process_group_manager as pgm
from pipeline_parallel import backward_step, log, timeline, train_step_pipeline_1f1b, train_step_pipeline_afab
from pipeline_schedules import timetable
from zero_bubble import deferred_weight_gradients, run_weight_gradients, split_weight_gradients


@timeline("forward")
def forward_pass(model, batch, *, chunk, input_tensor, last_stage, grad_acc_steps, device):
    """One chunk's forward for one micro-batch; on the model's last chunk the loss, scaled as train_step does."""
    output = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                   hidden_states=input_tensor, chunk=chunk)  # [batch, seq, hidden], or [batch, seq, vocab] last
    if not last_stage:
        return output
    target_ids = batch["target_ids"].to(device)  # [batch, seq]
    return F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target_ids.reshape(-1)) / grad_acc_steps


full_backward = backward_step  # interleaved 1F1B: B and W together (two units)
input_backward = timeline("backward")(backward_step.__wrapped__)  # zb_h1's B: the linears queue their W (one unit)
weight_backward = timeline("weight")(run_weight_gradients)  # zb_h1's W


class Held:
    """The (chunk, micro-batch) pairs whose forward has run and whose backward (zb_h1: W, which keeps each linear's
    input) has not: their activations stay in memory. peak: the most at once, what the schedule costs."""

    def __init__(self):
        self.graphs, self.count, self.peak = {}, 0, 0

    def push(self, key, input_tensor, output_tensor):
        self.graphs[key] = (input_tensor, output_tensor)
        self.count += 1
        self.peak = max(self.peak, self.count)

    def take(self, key):
        return self.graphs.pop(key)

    def release(self):
        self.count -= 1


class Mailbox:
    """The tensors in flight between this stage and its neighbours, by key ("activation" | "gradient", virtual
    stage, micro-batch): what the passes produced for sending, and the receives posted."""

    def __init__(self, shape, device, dtype):
        self.shape, self.device, self.dtype = shape, device, dtype
        self.global_rank = pgm.process_group_manager.pp_group_ids  # of each pipeline stage in this rank's pp group
        self.outgoing, self.incoming, self.sends = {}, {}, []

    def exchange(self, sends, receives):
        ops, buffers = [], []
        for key, peer in sends:
            log(f"{key[0]} of stage {key[1]}, micro-batch {key[2]}: send {tuple(self.outgoing[key].shape)} -> "
                f"rank {self.global_rank[peer]}")
            ops.append(dist.P2POp(dist.isend, self.outgoing.pop(key).contiguous(), self.global_rank[peer]))
        for key, peer in receives:
            buffers.append((key, torch.empty(self.shape, device=self.device, dtype=self.dtype)))
            ops.append(dist.P2POp(dist.irecv, buffers[-1][1], self.global_rank[peer]))
        works = dist.batch_isend_irecv(ops)
        # gloo gives a request per operation (each is waited for once); NCCL one for the whole batch
        per_op = [[work] for work in works] if len(works) == len(ops) else [works] * len(ops)
        self.sends += [(per_op[i], ops[i].tensor) for i in range(len(sends))]  # the tensor kept until it is sent
        for (key, buffer), op_works in zip(buffers, per_op[len(sends):]):
            self.incoming[key] = (op_works, buffer)

    def take(self, key):
        """The received tensor (waited for), or None where no stage sends one (the ends of the pipeline)."""
        if key not in self.incoming:
            return None
        works, buffer = self.incoming.pop(key)
        for work in works:
            work.wait()
        return buffer

    def finish(self):
        for works, _ in self.sends:
            for work in works:
                work.wait()
        self.sends = []


def train_step_pipeline_scheduled(model, data_loader, *, engine, virtual_pp_size, tensor_shapes, device, dtype):
    """One optimizer step's passes under engine ("interleaved_1f1b" or "zb_h1"). Same arguments and result as
    pipeline_parallel's train_step_pipeline_1f1b (the summed micro-batch losses on the last stage, 0.0 elsewhere)."""
    grid = pgm.process_group_manager
    p, m, v = grid.pp_world_size, data_loader.grad_acc_steps, virtual_pp_size
    last_stage = p * v - 1
    mailbox, held = Mailbox(tensor_shapes, device, dtype), Held()
    batches, weight_work, losses = {}, {}, []
    model.defer_reduction = True  # gradients only accumulate; reduced after the last pass
    split_weight_gradients(model, on=engine == "zb_h1")  # zb_h1: every linear's weight gradient can wait for W
    for _, event in timetable(engine, p, m, v)[grid.pp_rank]:
        if event[0] == "exchange":
            mailbox.exchange(event[1], event[2])
            continue
        kind, chunk, j = event[1]
        stage = chunk * p + grid.pp_rank
        if kind == "F":
            if chunk == 0:  # every stage draws every micro-batch, in order: all agree on the positions
                batches[j] = next(data_loader)
            input_tensor = mailbox.take(("activation", stage - 1, j))
            if input_tensor is not None:
                input_tensor.requires_grad_()  # collects the gradient to send back
            output = forward_pass(model, batches[j], chunk=chunk, input_tensor=input_tensor,
                                  last_stage=stage == last_stage, grad_acc_steps=m, device=device)
            if chunk == v - 1:
                del batches[j]
            if stage == last_stage:
                losses.append(output.detach())
            else:
                mailbox.outgoing[("activation", stage, j)] = output.detach()
            held.push((chunk, j), input_tensor, output)  # until its backward (zb_h1: its W) has run
        elif kind == "B":
            input_tensor, output = held.take((chunk, j))
            output_grad = mailbox.take(("gradient", stage + 1, j))
            if engine == "zb_h1":
                with deferred_weight_gradients() as work:
                    input_grad = input_backward(input_tensor, output, output_grad)
                weight_work[(chunk, j)] = work
            else:
                input_grad = full_backward(input_tensor, output, output_grad)
                held.release()
            if stage > 0:
                mailbox.outgoing[("gradient", stage, j)] = input_grad
        else:  # W
            count = weight_backward(weight_work.pop((chunk, j)))
            held.release()
            log(f"W of micro-batch {j}: {count} linears")
    mailbox.finish()
    model.reduce_gradients()  # every W has run: the gradients are complete
    log(f"{engine}: held at most {held.peak} micro-batches of activations (grad_acc_steps {m}, chunks {v})")
    return sum(losses, torch.zeros((), dtype=torch.float64, device=device))  # in float64, as Python floats


def train_step_pipeline(model, data_loader, *, engine, virtual_pp_size, tensor_shapes, device, dtype):
    """One optimizer step's passes under --pp_engine: step 7's AFAB, step 8's 1F1B, or a schedule run from its table."""
    if engine in ("afab", "1f1b"):
        step = train_step_pipeline_1f1b if engine == "1f1b" else train_step_pipeline_afab
        return step(model, data_loader, tensor_shapes=tensor_shapes, device=device, dtype=dtype)
    return train_step_pipeline_scheduled(model, data_loader, engine=engine, virtual_pp_size=virtual_pp_size,
                                         tensor_shapes=tensor_shapes, device=device, dtype=dtype)
