"""``CudaGraphs.patch_rows``: some rows of a primed slot's next decode inputs set on the device (the CPU stand-in of
the CUDA-graph slot path), the others left as the step before wrote them; refused where the next step could not be
fed anyway."""

from __future__ import annotations

import numpy as np
import pytest
from serve.test_slots import slot_lm

from onnxpipe.errors import OnnxpipeError


def test_patched_rows_take_their_token_and_place_and_the_others_keep_theirs(stdlib_cuda_model):
    lm = slot_lm(stdlib_cuda_model, True)
    s = lm.session
    graphs = s.graphs
    cache = s.new_cache(4, capacity=64)
    assert not graphs.patch_rows(cache, [1], [7], [3])  # not primed: no step has written the next inputs
    counts = np.array([5, 9, 2, 30])
    mask = (np.arange(counts.max())[None, :] < counts[:, None]).astype(np.int64)
    s.forward(np.array([[11], [12], [13], [14]]), mask, (counts - 1)[:, None], cache, want="argmax")
    slot = graphs.slots[(4, cache.capacity)]
    before = slot.ids.numpy().copy(), slot.mask.numpy().copy(), slot.positions.numpy().copy()
    assert slot.primed and before[1].sum(axis=1).tolist() == (counts + 1).tolist()  # the tail advanced every row
    assert graphs.patch_rows(cache, [1, 3], [42, 0], [20, 0])
    ids, m, positions = slot.ids.numpy(), slot.mask.numpy(), slot.positions.numpy()
    assert ids[:, 0].tolist() == [before[0][0, 0], 42, before[0][2, 0], 0]
    assert m.sum(axis=1).tolist() == [counts[0] + 1, 21, counts[2] + 1, 1]
    assert (m[1, :21] == 1).all() and (m[1, 21:] == 0).all()
    assert positions[:, 0].tolist() == [before[2][0, 0], 20, before[2][2, 0], 0]
    with pytest.raises(OnnxpipeError, match="no row"):
        graphs.patch_rows(cache, [4], [1], [0])
