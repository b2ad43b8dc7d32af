"""Planetoid loader: the real Cora files (published statistics), a synthetic set with known answers, hostile files."""

from __future__ import annotations

import collections
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from attnkit.tasks.datasets.planetoid import UnsafePickleError, load_planetoid

CORA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cora"
PARTS = ["x", "y", "tx", "ty", "allx", "ally", "graph", "test.index"]
needs_cora = pytest.mark.skipif(not (CORA / "ind.cora.x").is_file(), reason="../shared/data/cora not present")


@needs_cora
def test_real_cora_matches_the_published_statistics():
    d = load_planetoid(CORA, "cora")
    # Planetoid Cora (Yang et al. 2016; Kipf & Welling 2017, Table 1): 2708 nodes, 1433 features, 7 classes,
    # 5429 edges in the raw file = 5278 distinct undirected edges = 10556 directed ones, 140/500/1000 split
    assert d.x.shape == (2708, 1433) and d.x.dtype == torch.float32
    assert d.num_classes == 7 and d.y.shape == (2708,)
    assert set(d.y.unique().tolist()) == set(range(7))
    assert (len(d.train_idx), len(d.val_idx), len(d.test_idx)) == (140, 500, 1000)
    assert torch.equal(d.train_idx, torch.arange(140)) and torch.equal(d.val_idx, torch.arange(140, 640))
    assert torch.equal(d.test_idx, torch.arange(1708, 2708))
    # 20 labelled training nodes per class
    assert torch.bincount(d.y[d.train_idx], minlength=7).tolist() == [20] * 7
    # class sizes of Cora (Case_Based ... Theory): 298, 418, 818, 426, 217, 180, 351 in some label order
    assert sorted(torch.bincount(d.y).tolist()) == sorted([351, 217, 418, 818, 426, 298, 180])
    # binary bag of words, every paper has at least one word
    assert set(d.x.unique().tolist()) == {0.0, 1.0} and (d.x.sum(1) > 0).all()
    ei = d.edge_index
    assert ei.shape == (2, 10556)
    assert (ei[0] != ei[1]).all()
    pairs = set(map(tuple, ei.T.tolist()))
    assert len(pairs) == 10556 and all((b, a) in pairs for a, b in pairs)


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def _synthetic(root: Path, name="toy", test_ids=(13, 10, 12, 15)):
    """Node k has feature one-hot(k) and label k % 3; test ids may have gaps (as CiteSeer)."""
    import scipy.sparse as sp

    n_train = 6
    n_all = n_train + 500 + 4  # non-test nodes: 6 train, 500 validation, 4 more
    n_feat = 530  # one column per node id

    def feat(ids):
        m = np.zeros((len(ids), n_feat), dtype=np.float32)
        m[np.arange(len(ids)), ids] = 1.0
        return sp.csr_matrix(m)

    def lab(ids):
        m = np.zeros((len(ids), 3))
        m[np.arange(len(ids)), np.asarray(ids) % 3] = 1.0
        return m

    test_ids = [n_all + t - 10 for t in test_ids]  # shift so test ids follow the allx rows
    root.mkdir(parents=True, exist_ok=True)
    _write_pickle(root / f"ind.{name}.x", feat(list(range(n_train))))
    _write_pickle(root / f"ind.{name}.y", lab(list(range(n_train))))
    _write_pickle(root / f"ind.{name}.allx", feat(list(range(n_all))))
    _write_pickle(root / f"ind.{name}.ally", lab(list(range(n_all))))
    _write_pickle(root / f"ind.{name}.tx", feat(test_ids))
    _write_pickle(root / f"ind.{name}.ty", lab(test_ids))
    graph = collections.defaultdict(list, {0: [1, 0], 1: [0, 2], 2: [1], test_ids[0]: [0]})
    _write_pickle(root / f"ind.{name}.graph", graph)
    (root / f"ind.{name}.test.index").write_text("\n".join(map(str, test_ids)) + "\n")
    return test_ids, n_all


def test_synthetic_rows_land_on_their_node_ids_and_gaps_get_no_label(tmp_path):
    test_ids, n_all = _synthetic(tmp_path, test_ids=(13, 10, 12, 15))  # gaps at 11 and 14 (offsets)
    d = load_planetoid(tmp_path, "toy")
    lo, hi = min(test_ids), max(test_ids)
    assert d.num_nodes == hi + 1 and d.num_classes == 3
    for k in list(range(n_all)) + test_ids:
        assert d.x[k].argmax().item() == k and d.x[k].sum() == 1  # node k carries one-hot(k)
        assert d.y[k].item() == k % 3
    gaps = sorted(set(range(lo, hi + 1)) - set(test_ids))
    assert gaps and (d.x[gaps] == 0).all() and (d.y[gaps] == -1).all()
    assert d.test_idx.tolist() == sorted(test_ids)
    assert (len(d.train_idx), len(d.val_idx)) == (6, 500)
    # undirected, no self-loop, no duplicate: {0-1, 1-2, 0-test0}
    got = sorted(map(tuple, d.edge_index.T.tolist()))
    t0 = test_ids[0]
    assert got == sorted([(0, 1), (1, 0), (1, 2), (2, 1), (0, t0), (t0, 0)])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_malicious_pickle_is_rejected_before_it_runs(tmp_path):
    _synthetic(tmp_path)
    marker = tmp_path / "pwned"
    _write_pickle(tmp_path / "ind.toy.graph", _Evil(str(marker)))
    with pytest.raises(UnsafePickleError, match=r"ind\.toy\.graph: refusing to load os\.makedirs"):
        load_planetoid(tmp_path, "toy")
    assert not marker.exists()
    assert issubclass(UnsafePickleError, ValueError)


def test_pickle_of_an_arbitrary_builtin_is_rejected(tmp_path):
    _synthetic(tmp_path)
    # protocol-0 text pickle calling builtins.eval: the classic exploit shape
    (tmp_path / "ind.toy.x").write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(UnsafePickleError, match=r"ind\.toy\.x: refusing to load builtins\.eval"):
        load_planetoid(tmp_path, "toy")


def test_missing_file_names_the_path_and_what_belongs_there(tmp_path):
    _synthetic(tmp_path)
    (tmp_path / "ind.toy.graph").unlink()
    with pytest.raises(FileNotFoundError) as exc:
        load_planetoid(tmp_path, "toy")
    msg = str(exc.value)
    assert str(tmp_path / "ind.toy.graph") in msg and "ind.toy.test.index" in msg


def test_wrong_dataset_name_lists_what_is_there(tmp_path):
    _synthetic(tmp_path)
    with pytest.raises(FileNotFoundError, match="Data sets present there: toy"):
        load_planetoid(tmp_path, "cora")


def test_missing_directory_and_file_instead_of_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; expected a folder holding ind.cora.x"):
        load_planetoid(tmp_path / "nope", "cora")
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        load_planetoid(f, "cora")


def test_malformed_files_name_the_file_and_the_expectation(tmp_path):
    _synthetic(tmp_path)
    good = (tmp_path / "ind.toy.tx").read_bytes()
    (tmp_path / "ind.toy.tx").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match=r"ind\.toy\.tx is malformed: expected a Python pickle of a scipy sparse"):
        load_planetoid(tmp_path, "toy")
    _write_pickle(tmp_path / "ind.toy.tx", [1, 2, 3])  # allowed types, wrong content
    with pytest.raises(ValueError, match=r"ind\.toy\.tx is malformed: expected a scipy sparse matrix.*got a list"):
        load_planetoid(tmp_path, "toy")
    (tmp_path / "ind.toy.tx").write_bytes(good)
    (tmp_path / "ind.toy.test.index").write_text("510\nbanana\n")
    with pytest.raises(ValueError, match=r"test\.index is malformed: expected one integer node id per line; line 2"):
        load_planetoid(tmp_path, "toy")


def test_parts_that_disagree_are_reported(tmp_path):
    _synthetic(tmp_path)
    _write_pickle(tmp_path / "ind.toy.ty", np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"ind\.toy\.ty has 2 rows but .*ind\.toy\.tx has 4"):
        load_planetoid(tmp_path, "toy")
