"""The forward keeps prep's values for the backward where the memory rule allows (policy.tiling.history_policy):
the backward then runs prep no more, and its gradients are the ones it computed running prep again."""
from __future__ import annotations

import torch

import effc
from effc.policy.tiling import HISTORY_FACTOR, history_policy
from effc.runtime.launch import Launcher
from effc.runtime.verify import random_inputs


def test_history_policy_keeps_the_states_first_then_prep_within_the_budget():
    budget = HISTORY_FACTOR * 100
    assert history_policy(int(budget) + 1, 100, 10)[0] == 0          # states too large: nothing kept
    assert history_policy(50, 100, 0)[0] == 1                          # no prep
    assert history_policy(50, 100, int(budget) - 50)[0] == 2           # both fit
    level, why = history_policy(50, 100, int(budget) - 49)             # prep would pass the budget
    assert level == 1 and "recomputed" in why


def _grads(op, xs, monkeypatch, keep: bool):
    runs = []
    prep = Launcher.prep
    monkeypatch.setattr(Launcher, "prep", lambda self, *a, **k: (runs.append(1), prep(self, *a, **k))[1])
    if not keep:  # the budget of the states alone
        monkeypatch.setattr("effc.runtime.op.history_policy", lambda h, i, p=0: (1, "states only"))
    op._configs.clear()
    o = op(*xs)[0]
    g = torch.autograd.grad(o, xs, torch.ones_like(o))
    monkeypatch.undo()
    return g, len(runs)


def test_the_backward_reads_the_kept_prep_values(monkeypatch):
    op = effc.load("gated_delta_net")
    dims = {d: 64 for d in op.spec.dims}
    xs = [x.requires_grad_() for x in random_inputs(op.spec, 2, 100, 2, dims, torch.float32, "cpu", seed=3)]
    kept, runs_kept = _grads(op, xs, monkeypatch, keep=True)
    assert "with prep's values" in op.last_history_reason
    again, runs_again = _grads(op, xs, monkeypatch, keep=False)
    assert (runs_kept, runs_again) == (1, 2)
    for a, b in zip(kept, again):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_kept_prep_values_of_packed_sequences_match_the_reference(monkeypatch):
    """Varlen, an empty sequence among them: prep's buffers are laid out by each sequence's chunks."""
    monkeypatch.setattr("effc.runtime.op.history_policy", lambda h, i, p=0: (2 if p else 1, "kept, forced"))
    op = effc.load("gated_delta_net")
    op._configs.clear()
    dims = {d: 32 for d in op.spec.dims}
    xs = [x.requires_grad_() for x in random_inputs(op.spec, 1, 150, 2, dims, torch.float32, "cpu", seed=5)]
    cu = torch.tensor([0, 70, 70, 150], dtype=torch.int32)
    o = op(*xs, cu_seqlens=cu)[0]
    assert op.last_history_reason == "kept, forced"
    g = torch.randn_like(o)
    got = torch.autograd.grad(o, xs, g)
    ref = op.reference(*xs, cu_seqlens=cu)
    want = torch.autograd.grad(ref[0] if isinstance(ref, tuple) else ref, xs, g)
    for name, a, b in zip([d.name for d in op.spec.inputs], got, want):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max()), name


def test_dims_in_parts_run_prep_again(monkeypatch):
    """With K in parts (48 = 32 + 16) the split spec's kernels have prep values of their own names: the
    forward keeps none of them and the backward runs prep again, rather than reading an empty set."""
    op = effc.load("delta_net")
    dims = {d: 48 for d in op.spec.dims}
    xs = [x.requires_grad_() for x in random_inputs(op.spec, 1, 40, 1, dims, torch.float32, "cpu", seed=2)]
    o = op(*xs)[0]
    assert op.last_dim_parts != "no parts"
    g = torch.randn_like(o)
    got = torch.autograd.grad(o, xs, g)
    ref = op.reference(*xs)
    want = torch.autograd.grad(ref[0] if isinstance(ref, tuple) else ref, xs, g)
    for d, a, b in zip(op.spec.inputs, got, want):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max()), d.name


def test_save_states_keeps_the_states_and_prep_as_the_budget_allows():
    op = effc.load("gated_delta_net")
    xs = [x.requires_grad_() for x in random_inputs(op.spec, 2, 100, 2, {d: 64 for d in op.spec.dims},
                                                     torch.float32, "cpu", seed=3)]
    op(*xs, save_states=True)
    assert op.last_history_reason.endswith("with prep's values")
    op(*xs, save_states=False)
    assert op.last_history_reason == "recomputed as asked (save_states=False)"
