"""The dp x pp x tp grid: pure grid math for every factorization of 8, then one real 8-process run."""
import re
from types import SimpleNamespace

import pytest

from conftest import import_step

pgm = import_step("step2", "process_group_manager")

FACTORIZATIONS = [(dp, pp, 8 // (dp * pp)) for dp in (1, 2, 4, 8) for pp in (1, 2, 4, 8) if 8 % (dp * pp) == 0]


def test_all_factorizations_of_8_are_covered():
    assert len(FACTORIZATIONS) == 10  # ordered triples with product 8


@pytest.mark.parametrize("dp,pp,tp", FACTORIZATIONS)
def test_grid_groups_are_consistent(dp, pp, tp):
    groups = pgm.grid_groups(tp, pp, dp)
    coords = {rank: pgm.grid_coordinates(rank, tp, pp) for rank in range(8)}
    # every coordinate triple appears exactly once and maps back to its rank
    assert sorted(coords.values()) == sorted((d, p, t) for d in range(dp) for p in range(pp) for t in range(tp))
    for rank, (d, p, t) in coords.items():
        assert pgm.grid_rank(d, p, t, tp, pp) == rank
    for kind, size, axis in (("tp", tp, 2), ("pp", pp, 1), ("dp", dp, 0)):
        assert len(groups[kind]) == 8 // size
        assert sorted(r for group in groups[kind] for r in group) == list(range(8))  # a partition of the ranks
        for group in groups[kind]:
            assert len(group) == size
            # members differ only in this axis, and are ordered by it
            others = {tuple(c for i, c in enumerate(coords[r]) if i != axis) for r in group}
            assert len(others) == 1
            assert [coords[r][axis] for r in group] == list(range(size))
    # tp is the fastest-varying axis: tp groups are runs of consecutive ranks
    for group in groups["tp"]:
        assert group == list(range(group[0], group[0] + tp))


def test_validate_layout_names_the_offending_values():
    config = SimpleNamespace(num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4)
    assert pgm.validate_layout(8, 2, 2, 2, config) == []
    assert pgm.validate_layout(4, 4, 1, 1, config) == []
    (error,) = pgm.validate_layout(6, 2, 2, 2, config)
    assert "world size 6" in error and "= 8" in error
    errors = pgm.validate_layout(8, 8, 1, 1, config)
    assert any("num_key_value_heads 4 is not divisible by tp_size 8" in e for e in errors)
    (error,) = pgm.validate_layout(8, 1, 8, 1, config)
    assert "pp_size 8 is larger than num_hidden_layers 4" in error
    config.num_attention_heads = 6
    assert any("num_attention_heads 6" in e for e in pgm.validate_layout(4, 4, 1, 1, config))


def test_real_8_process_grid(torchrun):
    """Each of 8 gloo processes reports the groups it joined; they must agree with the grid math."""
    run = torchrun("step2", 8, "--tp_size", 2, "--pp_size", 2, "--dp_size", 2, "--seq_len", 16,
                   "--micro_batch_size", 1, "--max_tokens", 16)
    assert run.returncode == 0, run
    pattern = re.compile(r"rank (\d+): DP\((\d)\)-PP\((\d)\)-TP\((\d)\) \| tp group (\[.*?\]) \| pp group (\[.*?\]) "
                         r"\| dp group (\[.*?\]) \| pp prev (\w+) next (\w+)")
    reports = {int(m.group(1)): m.groups()[1:] for m in pattern.finditer(run.stdout)}
    assert sorted(reports) == list(range(8))
    groups = pgm.grid_groups(2, 2, 2)
    for rank, (d, p, t, tp_group, pp_group, dp_group, prev, nxt) in reports.items():
        assert (int(d), int(p), int(t)) == pgm.grid_coordinates(rank, 2, 2)
        for kind, seen in (("tp", tp_group), ("pp", pp_group), ("dp", dp_group)):
            assert eval(seen) == next(g for g in groups[kind] if rank in g)
        pp_ranks = eval(pp_group)
        assert prev == ("None" if int(p) == 0 else str(pp_ranks[int(p) - 1]))
        assert nxt == ("None" if int(p) == 1 else str(pp_ranks[int(p) + 1]))
    assert "Step: 1 | Loss:" in run.stdout
