"""Pipeline schedules as tables: the order in which each stage runs its passes, and when each tensor crosses
between stages. Plain Python, no tensors: scheduled_pipeline.py runs a table, tools/pipeline_bubble.py and the
tests read it.

A pass is Pass(kind, chunk, micro_batch): kind F (forward), B (backward: with zb_h1 the input gradient only) or
W (zb_h1's weight gradients). With pp_size stages and virtual_pp_size = v chunks per stage the model is cut into
pp_size * v *virtual stages* of consecutive layers; rank r holds the chunks r, r + pp_size, r + 2 pp_size, ...
(its chunk c is virtual stage c * pp_size + r), so a micro-batch goes round the ranks v times.

    interleaved_1f1b   Megatron's interleaved 1F1B (Narayanan et al. 2021): micro-batches go in groups of pp_size,
                       each group through chunk 0, then chunk 1, ...; bubble (p - 1) / (v m)
    zb_h1              zero bubble H1 (Qi et al. 2023): 1F1B with the backward split into B and W, and stage r
                       keeping its r oldest W for the end of the step; bubble (p - 1) / (3 m) when F = B = W

(m micro-batches, p stages; bubbles as a fraction of the ideal time, a stage's own work, for equal passes.)
"""
from collections import namedtuple

Pass = namedtuple("Pass", "kind chunk micro_batch")
ENGINES = ("afab", "1f1b", "interleaved_1f1b", "zb_h1")
# Each pass's length in units of a forward, the schedules' assumption: an unsplit backward is twice a forward;
# zb_h1 splits it into B and W of one unit each.
UNITS = {"F": 1, "B": 2, "W": 1}
SPLIT_UNITS = {"F": 1, "B": 1, "W": 1}


def interleaved_1f1b(pp_size, pp_rank, micro_batches, chunks):
    """Rank pp_rank's passes. The k-th forward is chunk (k // p) % v of micro-batch (k // (p v)) p + k % p; backwards
    go the same way through the chunks in reverse. Warm-up: 2 (p - r - 1) + (v - 1) p forwards, enough to keep
    the ranks after it busy; steady state: one forward, one backward; cool-down: the backwards left over."""
    p, v, total = pp_size, chunks, micro_batches * chunks

    def micro_batch(k):
        return (k // (p * v)) * p + k % p

    forwards = [Pass("F", (k // p) % v, micro_batch(k)) for k in range(total)]
    backwards = [Pass("B", v - 1 - (k // p) % v, micro_batch(k)) for k in range(total)]
    warmup = min(2 * (p - pp_rank - 1) + (v - 1) * p, total)
    passes = forwards[:warmup]  # warm-up
    for k in range(total - warmup):  # steady state
        passes += [forwards[warmup + k], backwards[k]]
    return passes + backwards[total - warmup:]  # cool-down


def one_f_one_b(pp_size, pp_rank, micro_batches, chunks=1):
    """Step 8's 1F1B as a table (for the pictures and the bubble tool): pp_size - r - 1 forwards of warm-up, then
    one forward, one backward."""
    warmup = min(pp_size - pp_rank - 1, micro_batches)
    passes = [Pass("F", 0, j) for j in range(warmup)]
    for j in range(micro_batches - warmup):
        passes += [Pass("F", 0, warmup + j), Pass("B", 0, j)]
    return passes + [Pass("B", 0, j) for j in range(micro_batches - warmup, micro_batches)]


def zb_h1(pp_size, pp_rank, micro_batches, chunks=1):
    """Rank pp_rank's passes: 1F1B's forwards and backwards (B: the input gradient only, sent upstream at once),
    each B followed by the W of the oldest micro-batch whose W is pending, except that stage r leaves its r
    oldest W pending until the cool-down, where they fill the time the later stages' B take to come back.
    At most pp_size micro-batches are held (forward run, W not yet) on every stage: 1F1B's peak."""
    warmup = min(pp_size - pp_rank - 1, micro_batches)
    passes = [Pass("F", 0, j) for j in range(warmup)]  # warm-up
    pending = []  # micro-batches whose B ran and whose W has not

    def backward(j):
        passes.append(Pass("B", 0, j))
        pending.append(j)
        if len(pending) > pp_rank:  # stage r keeps r of them back
            passes.append(Pass("W", 0, pending.pop(0)))

    for j in range(micro_batches - warmup):  # steady state
        passes.append(Pass("F", 0, warmup + j))
        backward(j)
    for j in range(micro_batches - warmup, micro_batches):  # cool-down
        backward(j)
    return passes + [Pass("W", 0, j) for j in pending]  # the W kept back: the gradients are complete after these


SCHEDULES = {"1f1b": one_f_one_b, "interleaved_1f1b": interleaved_1f1b, "zb_h1": zb_h1}


def schedule_errors(args, num_layers):
    """What makes a schedule impossible, one message each (train.py's check_command_line joins them)."""
    engine, pp_size, virtual_pp_size = args.pp_engine, args.pp_size, args.virtual_pp_size
    micro_batches, errors = args.gradient_accumulation_steps, []
    if virtual_pp_size > 1 and engine != "interleaved_1f1b":
        errors.append(f"--virtual_pp_size {virtual_pp_size} needs --pp_engine interleaved_1f1b")
    if virtual_pp_size > 1 and pp_size == 1:  # one stage runs the whole model as one chunk: V would be ignored
        errors.append(f"--virtual_pp_size {virtual_pp_size} needs --pp_size > 1: it cuts each pipeline stage's layers")
    if pp_size * virtual_pp_size > num_layers:
        errors.append(f"pp_size x virtual_pp_size = {pp_size * virtual_pp_size} chunks for {num_layers} layers: "
                      f"each chunk needs at least one layer")
    if engine == "interleaved_1f1b" and pp_size > 1 and micro_batches % pp_size:
        errors.append(f"--pp_engine interleaved_1f1b runs the micro-batches in groups of pp_size: "
                      f"--gradient_accumulation_steps {micro_batches} is not a multiple of --pp_size {pp_size}")
    return errors


def held_theory(engine, pp_size, pp_rank, micro_batches, chunks=1):
    """The most (chunk, micro-batch) pairs stage pp_rank holds activations for at once: forward run and backward
    (zb_h1: W) not yet."""
    if engine == "interleaved_1f1b":
        return min(2 * (pp_size - pp_rank - 1) + (chunks - 1) * pp_size + 1, micro_batches * chunks)
    if engine == "zb_h1":
        return min(pp_size, micro_batches)
    if engine == "1f1b":
        return min(pp_size - pp_rank, micro_batches)
    return micro_batches  # afab


def bubble_theory(engine, pp_size, micro_batches, chunks=1):
    """The idle time of the busiest stage over its work, for passes of UNITS (SPLIT_UNITS for zb_h1)."""
    p, m = pp_size, micro_batches
    return {"afab": (p - 1) / m, "1f1b": (p - 1) / m, "interleaved_1f1b": (p - 1) / (chunks * m),
            "zb_h1": (p - 1) / (3 * m)}[engine]


def timetable(engine, pp_size, micro_batches, chunks=1):
    """When every pass runs and every tensor crosses, for passes of the schedule's units (a simulation of the
    whole pipeline). Returns one list per rank of (time, event), in the order the rank meets them:
    ("exchange", sends, receives) at the time a tensor is ready, sends and receives being lists of
    (key, peer rank), a key ("activation" | "gradient", virtual stage, micro-batch) naming what the stage sent;
    ("pass", Pass) when a pass starts. At equal times the exchanges come first. Every rank posts the same
    exchange at the same time, so they match in order on both sides: no rank waits for one that waits for it."""
    units = SPLIT_UNITS if engine == "zb_h1" else UNITS
    passes = [SCHEDULES[engine](pp_size, rank, micro_batches, chunks) for rank in range(pp_size)]
    last_stage = pp_size * chunks - 1
    done = {}  # (kind, virtual stage, micro-batch) -> time it ended
    clock, position = [0] * pp_size, [0] * pp_size
    events = [[] for _ in range(pp_size)]
    moved = True
    while moved:
        moved = False
        for rank in range(pp_size):
            while position[rank] < len(passes[rank]):
                kind, chunk, j = passes[rank][position[rank]]
                stage = chunk * pp_size + rank
                needs = {"F": ("F", stage - 1, j) if stage > 0 else None,
                         "B": ("B", stage + 1, j) if stage < last_stage else ("F", stage, j),
                         "W": ("B", stage, j)}[kind]
                if needs is not None and needs not in done:
                    break  # waits for another rank
                start = max(clock[rank], done[needs] if needs else 0)
                clock[rank] = done[(kind, stage, j)] = start + units[kind]
                events[rank].append((start, 1, ("pass", passes[rank][position[rank]])))
                position[rank] += 1
                moved = True
                target = stage + 1 if kind == "F" else stage - 1
                if kind != "W" and 0 <= target <= last_stage:
                    key = ("activation" if kind == "F" else "gradient", stage, j)
                    events[rank].append((clock[rank], 0, ("exchange", [(key, target % pp_size)], [])))
                    events[target % pp_size].append((clock[rank], 0, ("exchange", [], [(key, rank)])))
    if any(position[rank] < len(passes[rank]) for rank in range(pp_size)):
        raise RuntimeError(f"the {engine} schedule deadlocks at pp_size {pp_size}, {micro_batches} micro-batches")
    return [merge_exchanges(sorted(rank_events, key=lambda e: (e[0], e[1]))) for rank_events in events]


def merge_exchanges(events):
    """A rank's exchanges at the same time as one (one batch of sends and receives), in a fixed order."""
    merged = []
    for time, _, event in events:
        if event[0] == "exchange" and merged and merged[-1][0] == time and merged[-1][1][0] == "exchange":
            merged[-1] = (time, ("exchange", merged[-1][1][1] + event[1], merged[-1][1][2] + event[2]))
        else:
            merged.append((time, event))
    return [(time, ("exchange", sorted(e[1]), sorted(e[2])) if e[0] == "exchange" else e) for time, e in merged]
