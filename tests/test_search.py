"""contrastkit.search: exact tiled top-k against a materialised float64 reference, tie and
clipping rules, exclusions, dtypes; faiss methods against the exact search."""

from __future__ import annotations

import pytest
import torch

from contrastkit.search import build_faiss_index, exact_topk, topk


def _reference(q, c, k, exclude=None):
    """Materialised float64 ranking: sort by (score desc, index asc)."""
    s = q.double() @ c.double().T
    if exclude is not None:
        for i, ex in enumerate(exclude):
            s[i, list(ex)] = float("-inf")
    out_s, out_i = [], []
    for row in s.tolist():
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        out_i.append([j if row[j] != float("-inf") else -1 for j in order])
        out_s.append([row[j] for j in order])
    return torch.tensor(out_s, dtype=torch.float64), torch.tensor(out_i, dtype=torch.long)


@pytest.mark.parametrize("block_size", [1, 7, 64, 10_000])
def test_exact_matches_reference(block_size):
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(13, 8, generator=g, dtype=torch.float64), torch.randn(200, 8, generator=g, dtype=torch.float64)
    s, i = exact_topk(q, c, 17, block_size=block_size, query_block_size=5)
    rs, ri = _reference(q, c, 17)
    assert s.dtype == torch.float32 and i.dtype == torch.long and s.shape == (13, 17)
    assert torch.equal(i, ri)
    assert torch.allclose(s.double(), rs, atol=1e-6)


def test_ties_lower_index_first_regardless_of_blocks():
    # integer-valued embeddings: many exactly equal scores, across block boundaries
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-1, 2, (20, 4), generator=g).float()
    c = torch.randint(-1, 2, (97, 4), generator=g).float()
    rs, ri = _reference(q, c, 30)
    for bs in (1, 3, 16, 31, 40, 64, 97):
        s, i = exact_topk(q, c, 30, block_size=bs)
        assert torch.equal(i, ri), bs
        assert torch.equal(s.double(), rs)


def test_hand_computed_tie_and_clip():
    q = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[0.5, 0.0], [1.0, 0.0], [1.0, 0.0]])
    s, i = exact_topk(q, c, 10)            # k clipped to C = 3
    assert i.tolist() == [[1, 2, 0]] and s.tolist() == [[1.0, 1.0, 0.5]]


def test_exclude_and_padding():
    g = torch.Generator().manual_seed(2)
    q, c = torch.randn(4, 6, generator=g), torch.randn(9, 6, generator=g)
    exclude = [[0, 1, 2], [], [8], list(range(9))]
    s, i = exact_topk(q, c, 7, exclude=exclude, block_size=4)
    rs, ri = _reference(q, c, 7, exclude)
    assert torch.equal(i, ri)
    assert torch.isneginf(s[3]).all() and (i[3] == -1).all()
    assert (i[0] == -1).sum() == 1 and not set(i[0].tolist()) & {0, 1, 2}
    assert torch.allclose(s[:3][i[:3] >= 0].double(), rs[:3][ri[:3] >= 0], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype):
    g = torch.Generator().manual_seed(3)
    q, c = torch.randn(5, 16, generator=g).to(dtype), torch.randn(50, 16, generator=g).to(dtype)
    s, i = exact_topk(q, c, 5, block_size=8)
    rs, ri = _reference(q.double(), c.double(), 5)  # the low-precision inputs, exactly
    assert s.dtype == torch.float32
    assert torch.equal(i, ri)


def test_bad_inputs():
    q, c = torch.randn(2, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="k must be a positive int"):
        exact_topk(q, c, 0)
    with pytest.raises(ValueError, match="dimension"):
        exact_topk(q, torch.randn(5, 3), 2)
    with pytest.raises(ValueError, match="corpus row 3"):
        c2 = c.clone(); c2[3, 1] = float("nan")
        exact_topk(q, c2, 2)
    huge = torch.full((3, 4), 1e308, dtype=torch.float64)  # finite, but its sum overflows
    assert exact_topk(huge[:1], huge, 2)[1].tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="one list per query"):
        exact_topk(q, c, 2, exclude=[[0]])
    with pytest.raises(ValueError, match=r"exclude\[1\].*outside"):
        exact_topk(q, c, 2, exclude=[[0], [5]])
    with pytest.raises(ValueError, match=r"exclude\[0\].*outside"):
        topk(q, c, 2, exclude=[[-1], []], method="faiss-flat")
    with pytest.raises(ValueError, match="method must be one of"):
        topk(q, c, 2, method="annoy")
    with pytest.raises(ValueError, match="block_size"):
        exact_topk(q, c, 2, block_size=0)


def test_empty_inputs():
    s, i = exact_topk(torch.randn(0, 4), torch.randn(5, 4), 3)
    assert s.shape == (0, 3)
    s, i = exact_topk(torch.randn(2, 4), torch.randn(0, 4), 3)
    assert s.shape == (2, 0)


def _clustered(n, d, n_clusters, seed, noise=0.15):
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(n_clusters, d, generator=g), dim=-1)
    x = centers[torch.randint(0, n_clusters, (n,), generator=g)] + noise * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=-1)


def test_faiss_flat_equals_exact():
    pytest.importorskip("faiss")
    c = _clustered(3000, 32, 20, seed=4)
    q = _clustered(40, 32, 20, seed=5)
    s, i = topk(q, c, 10, method="faiss-flat")
    es, ei = topk(q, c, 10, method="exact")
    assert torch.equal(i, ei)
    assert torch.allclose(s, es, atol=1e-5)
    # exclusion through faiss: same as exact
    exclude = [ei[r, :3].tolist() for r in range(40)]
    s, i = topk(q, c, 10, method="faiss-flat", exclude=exclude)
    es, ei = topk(q, c, 10, method="exact", exclude=exclude)
    assert torch.equal(i, ei)


@pytest.mark.parametrize("method", ["faiss-ivf", "faiss-hnsw"])
def test_approximate_recall(method):
    pytest.importorskip("faiss")
    c = _clustered(6000, 32, 50, seed=6)
    q = _clustered(100, 32, 50, seed=7)
    _, ei = exact_topk(q, c, 10)
    s, i = topk(q, c, 10, method=method)
    recall = sum(len(set(a) & set(b)) for a, b in zip(i.tolist(), ei.tolist())) / ei.numel()
    assert recall >= 0.9, recall
    # the returned scores are the true inner products of the returned rows, sorted
    true = (q[:, None, :] * c[i]).sum(-1)
    assert torch.allclose(s, true, atol=1e-5)
    assert (s[:, 1:] <= s[:, :-1] + 1e-6).all()


def test_auto_is_exact_unless_a_faiss_threshold_is_given():
    from contrastkit.search import resolve_method

    assert resolve_method("auto", 10**9) == "exact"                      # no threshold: exact at any size
    assert resolve_method("auto", 999, faiss_threshold=1000) == "exact"
    assert resolve_method("auto", 1000, faiss_threshold=1000) == "faiss-ivf"
    assert resolve_method("faiss-hnsw", 5) == "faiss-hnsw"
    for bad in (0, -3, True, 2.5):
        with pytest.raises(ValueError, match="faiss_threshold must be None or a positive int"):
            resolve_method("auto", 10, faiss_threshold=bad)
    with pytest.raises(ValueError, match="method must be one of"):
        resolve_method("annoy", 10)


def test_auto_switches_to_ivf_above_threshold():
    pytest.importorskip("faiss")
    c = _clustered(4000, 16, 10, seed=8)
    q = _clustered(20, 16, 10, seed=9)
    exact = topk(q, c, 5, method="auto")  # no threshold: exact
    assert torch.equal(exact[1], exact_topk(q, c, 5)[1])
    assert torch.equal(topk(q, c, 5, method="auto", faiss_threshold=4001)[1], exact[1])
    ivf = topk(q, c, 5, method="auto", faiss_threshold=1000)
    ivf_named = topk(q, c, 5, method="faiss-ivf")
    assert torch.equal(ivf[1], ivf_named[1])  # same seeded index
    index = build_faiss_index(c, "faiss-ivf")
    again = topk(q, c, 5, method="faiss-ivf", index=index)
    assert torch.equal(again[1], ivf_named[1])
    with pytest.raises(ValueError, match="index holds"):
        topk(q, c[:10], 5, method="faiss-ivf", index=index)


def test_docstring_examples():
    import doctest

    import contrastkit.search.ann as ann
    import contrastkit.search.exact as exact

    for module in (exact, ann):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_a_non_finite_row_is_named_in_any_block_of_the_check(monkeypatch):
    import contrastkit.search.exact as exact

    monkeypatch.setattr(exact, "_CHECK_ENTRIES", 8)        # two rows of 4 per block
    q, c = torch.randn(2, 4), torch.randn(9, 4)
    c[7, 2] = float("inf")
    with pytest.raises(ValueError, match="corpus row 7 has a non-finite"):
        exact_topk(q, c, 2)
    c[7, 2] = 0.0
    assert exact_topk(q, c, 2)[1].shape == (2, 2)


def test_search_memory_does_not_hold_a_copy_of_the_corpus():
    """Peak resident memory added by one search over a 400,000 x 64 float32 corpus (98 MiB)
    stays under half the corpus: the checks and the tiles never copy it whole (the
    finiteness check used to sum it as float64, 2x the corpus)."""
    import subprocess
    import sys

    code = """
import resource, torch
from contrastkit.search import exact_topk
c = torch.randn(400_000, 64); q = torch.randn(50, 64)
exact_topk(q[:1], c[:10], 1)                         # warm up the kernels and the allocator
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
exact_topk(q, c, 10)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    added_mib = float(out.stdout.strip().splitlines()[-1])
    assert added_mib < 0.5 * 400_000 * 64 * 4 / 2**20, added_mib
