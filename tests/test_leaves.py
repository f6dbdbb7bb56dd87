"""The engine's flattener gives pytree's leaves, in pytree's order, for every structure a module call can see."""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import pytest
import torch
from torch.utils._pytree import tree_flatten

from mas_local.importance.leaves import flat_leaves, tensor_leaves

Pair = namedtuple("Pair", "a b")


def _cases():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 3, generator=g) for _ in range(6)]
    p = torch.nn.Parameter(torch.randn(3, generator=g))
    cases = [
        t[0],
        p,
        (t[0], t[1]),
        ((t[0], None, 3), {"mask": t[1], "flag": True, "scale": 0.5}),
        [t[0], [t[1], (t[2], {"z": t[3], "a": t[4]})]],
        {"b": t[0], "a": [t[1], None]},
        Pair(t[0], (t[1], t[2])),
        OrderedDict([("y", t[0]), ("x", t[1])]),
        torch.max(t[5], dim=0),  # a return type (structseq)
        (t[0].shape, "text", None),
        ((), {}),
        (p, (t[0], Pair(t[1], [t[2], p]))),
    ]
    try:
        from transformers.modeling_outputs import BaseModelOutputWithPast

        cases.append(((BaseModelOutputWithPast(last_hidden_state=t[0], hidden_states=(t[1], t[2])),), {}))
    except ImportError:  # transformers is a test dependency; keep the torch cases meaningful without it
        pass
    return cases


@pytest.mark.parametrize("case", range(len(_cases())))
def test_flat_leaves_equal_pytree(case):
    obj = _cases()[case]
    want = tree_flatten(obj)[0]
    got = flat_leaves(obj)
    assert len(got) == len(want)
    assert all(a is b for a, b in zip(got, want)), (got, want)
    assert [id(x) for x in tensor_leaves(obj)] == [id(x) for x in want if isinstance(x, torch.Tensor)]
