"""Planetoid citation graphs (Cora, CiteSeer, PubMed) from the original ``ind.<name>.*`` files, read safely.

The files (Yang et al. 2016, https://github.com/kimiyoung/planetoid) are Python-2 pickles:

    ind.<name>.x          scipy CSR (n_train, F)   features of the labelled training nodes
    ind.<name>.y          ndarray   (n_train, C)   their one-hot labels
    ind.<name>.allx       scipy CSR (n_all, F)     features of every node that is not a test node
    ind.<name>.ally       ndarray   (n_all, C)     their one-hot labels (all-zero row = no label)
    ind.<name>.tx         scipy CSR (n_test, F)    features of the test nodes, in test.index order
    ind.<name>.ty         ndarray   (n_test, C)    their one-hot labels
    ind.<name>.graph      dict {node: [neighbours]}
    ind.<name>.test.index text, one test node id per line (unsorted)

A pickle can run any code while it loads, so these are read with :class:`RestrictedUnpickler`, which only
builds numpy arrays, scipy CSR matrices, ``collections.defaultdict`` and lists, and refuses anything else.

The split is the standard one (Kipf & Welling's loader, also PyTorch Geometric's): train = the first
``n_train`` nodes, validation = the next 500, test = the nodes in ``test.index``. Where the test ids have
gaps (CiteSeer has test nodes with no features in the files), the missing rows become all-zero features and
label -1, as the standard loader does, and they are in no split.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["GraphData", "RestrictedUnpickler", "UnsafePickleError", "load_planetoid", "PLANETOID_PARTS"]

PLANETOID_PARTS = ("x", "y", "tx", "ty", "allx", "ally", "graph")
NUM_VAL = 500


class UnsafePickleError(ValueError):
    """A pickle asked for a class or function outside the Planetoid allow-list."""


def _reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct as fn
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct as fn
    return fn


def _csr():
    from scipy.sparse import csr_matrix

    return csr_matrix


# (module, name) as written in the pickle -> a function returning the object; nothing else may be loaded
_ALLOWED = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("scipy.sparse.csr", "csr_matrix"): _csr,
    ("scipy.sparse._csr", "csr_matrix"): _csr,
    ("scipy.sparse", "csr_matrix"): _csr,
    ("collections", "defaultdict"): lambda: collections.defaultdict,
    ("__builtin__", "list"): lambda: list,
    ("builtins", "list"): lambda: list,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that builds only what Planetoid files hold: numpy arrays, scipy CSR matrices, dicts of lists.

    Any other global (``os.system``, ``builtins.eval``, a user class, ...) raises :class:`UnsafePickleError`
    before it is imported or called. Persistent ids are refused too.
    """

    def find_class(self, module: str, name: str):
        getter = _ALLOWED.get((module, name))
        if getter is None:
            raise UnsafePickleError(
                f"refusing to load {module}.{name}: Planetoid files may only hold numpy arrays, scipy CSR "
                "matrices and a dict of lists"
            )
        return getter()

    def persistent_load(self, pid):
        raise UnsafePickleError("refusing a pickle with persistent ids: not a Planetoid file")


def _unpickle(path: str, what: str):
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}; expected {what}. The file is not loaded.") from None
    except Exception as exc:  # truncated, not a pickle, wrong protocol, ...
        raise ValueError(
            f"{path} is malformed: expected a Python pickle of {what}; reading it failed with "
            f"{type(exc).__name__}: {exc}"
        ) from None
    return obj


def _as_matrix(obj, path: str, what: str) -> np.ndarray:
    """Dense float32 2-D array from a CSR matrix or ndarray, else ValueError naming the file."""
    import scipy.sparse as sp

    if sp.issparse(obj):
        try:
            arr = obj.toarray()
        except Exception as exc:
            raise ValueError(f"{path} is malformed: expected {what}; its sparse matrix is broken ({exc})") from None
    elif isinstance(obj, np.ndarray):
        arr = obj
    else:
        raise ValueError(f"{path} is malformed: expected {what}; got a {type(obj).__name__}")
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(
            f"{path} is malformed: expected {what}; got an array of shape {arr.shape} and dtype {arr.dtype}"
        )
    return np.asarray(arr, dtype=np.float32)


def _read_test_index(path: str) -> np.ndarray:
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            s = line.strip()
            if not s:
                continue
            try:
                out.append(int(s))
            except ValueError:
                raise ValueError(
                    f"{path} is malformed: expected one integer node id per line; line {lineno} is {s[:40]!r}"
                ) from None
    if not out:
        raise ValueError(f"{path} is malformed: expected one integer node id per line; the file is empty")
    return np.asarray(out, dtype=np.int64)


@dataclass(frozen=True)
class GraphData:
    """A node-classification graph.

    Shape:
        x ``(N, F)`` float32; y ``(N,)`` int64 class ids (-1 = no label); edge_index ``(2, E)`` int64,
        row 0 = source, row 1 = target, both directions of every undirected edge, no self-loops, no
        duplicates; train_idx / val_idx / test_idx int64 node ids.
    """

    name: str
    x: Tensor
    y: Tensor
    edge_index: Tensor
    train_idx: Tensor
    val_idx: Tensor
    test_idx: Tensor
    num_classes: int

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])


def edges_from_dict(graph: dict, num_nodes: int, path: str = "graph") -> Tensor:
    """Undirected ``{node: [neighbours]}`` -> ``(2, E)`` both directions, no self-loops, no duplicates."""
    src, dst = [], []
    try:
        for u, nbrs in graph.items():
            for v in nbrs:
                src.append(int(u))
                dst.append(int(v))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{path} is malformed: expected a dict mapping node ids to lists of node ids ({exc})"
        ) from None
    s = np.asarray(src + dst, dtype=np.int64)
    d = np.asarray(dst + src, dtype=np.int64)
    if s.size and (s.min() < 0 or s.max() >= num_nodes):
        raise ValueError(
            f"{path} is malformed: node ids must lie in [0, {num_nodes}) (the number of feature rows); got "
            f"[{s.min()}, {s.max()}]"
        )
    keep = s != d
    key = np.unique(s[keep] * num_nodes + d[keep])
    return torch.from_numpy(np.stack([key // num_nodes, key % num_nodes]))  # (2, E)


def load_planetoid(root: str | os.PathLike, name: str) -> GraphData:
    """Read ``ind.<name>.*`` from the folder ``root`` (no download, no plain unpickling).

    Args:
        root: folder holding the eight Planetoid files of ``name``.
        name: data set name as in the file names (``cora``, ``citeseer``, ``pubmed``, ...).

    Returns:
        :class:`GraphData` with the standard split (train = labelled ``x``, val = next 500, test = test.index).

    Raises:
        FileNotFoundError: ``root`` or one of the files is missing (names the path and what belongs there).
        NotADirectoryError: ``root`` is a file.
        UnsafePickleError (a ValueError): a file asks to load anything but arrays / CSR / dict of lists.
        ValueError: a file is malformed or the files disagree (names the file and what was expected).
    """
    if not isinstance(name, str) or not name or os.sep in name or "/" in name:
        raise ValueError(f"name must be a data set name such as 'cora' (as in ind.cora.x); got {name!r}")
    root = os.fspath(root)
    expected = ", ".join(f"ind.{name}.{p}" for p in PLANETOID_PARTS + ("test.index",))
    if not os.path.exists(root):
        raise FileNotFoundError(
            f"Planetoid data directory {root!r} does not exist; expected a folder holding {expected} "
            "(for Cora in this project: ../shared/data/cora)"
        )
    if not os.path.isdir(root):
        raise NotADirectoryError(
            f"Planetoid data path {root!r} is not a directory; expected a folder holding {expected}"
        )

    paths = {p: os.path.join(root, f"ind.{name}.{p}") for p in PLANETOID_PARTS + ("test.index",)}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        found = sorted({f.split(".")[1] for f in os.listdir(root) if f.startswith("ind.") and f.count(".") >= 2})
        hint = f" Data sets present there: {', '.join(found)}." if found else ""
        raise FileNotFoundError(
            f"missing Planetoid file {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f"; expected in {root!r}: {expected}.{hint}"
        )

    what = {
        "x": "a scipy sparse matrix (labelled training nodes x features)",
        "tx": "a scipy sparse matrix (test nodes x features)",
        "allx": "a scipy sparse matrix (non-test nodes x features)",
        "y": "a numpy array (labelled training nodes x classes, one-hot)",
        "ty": "a numpy array (test nodes x classes, one-hot)",
        "ally": "a numpy array (non-test nodes x classes, one-hot)",
        "graph": "a dict mapping each node id to its list of neighbour ids",
    }
    raw = {p: _unpickle(paths[p], what[p]) for p in PLANETOID_PARTS}
    mats = {p: _as_matrix(raw[p], paths[p], what[p]) for p in ("x", "y", "tx", "ty", "allx", "ally")}
    graph = raw["graph"]
    if not isinstance(graph, dict):
        raise ValueError(f"{paths['graph']} is malformed: expected {what['graph']}; got {type(graph).__name__}")
    test_idx_reorder = _read_test_index(paths["test.index"])

    # the parts must agree with each other
    for feat, lab in (("x", "y"), ("tx", "ty"), ("allx", "ally")):
        if mats[feat].shape[0] != mats[lab].shape[0]:
            raise ValueError(
                f"{paths[lab]} has {mats[lab].shape[0]} rows but {paths[feat]} has {mats[feat].shape[0]}; "
                "expected one label row per feature row"
            )
    n_feat = {mats[p].shape[1] for p in ("x", "tx", "allx")}
    n_cls = {mats[p].shape[1] for p in ("y", "ty", "ally")}
    if len(n_feat) != 1 or len(n_cls) != 1:
        raise ValueError(
            f"Planetoid files in {root!r} disagree: feature columns {sorted(n_feat)}, label columns "
            f"{sorted(n_cls)}; expected one feature count and one class count"
        )
    if mats["tx"].shape[0] != len(test_idx_reorder):
        raise ValueError(
            f"{paths['tx']} has {mats['tx'].shape[0]} rows but {paths['test.index']} lists "
            f"{len(test_idx_reorder)} test nodes; expected one row per test node"
        )

    tx, ty = mats["tx"], mats["ty"]
    test_idx_range = np.sort(test_idx_reorder)
    lo, hi = int(test_idx_range[0]), int(test_idx_range[-1])
    if hi - lo + 1 != len(test_idx_range):
        # test ids with gaps (CiteSeer): give the missing test nodes zero features and no label
        full = hi - lo + 1
        tx_ext = np.zeros((full, tx.shape[1]), dtype=np.float32)
        tx_ext[test_idx_range - lo] = tx
        ty_ext = np.zeros((full, ty.shape[1]), dtype=np.float32)
        ty_ext[test_idx_range - lo] = ty
        tx, ty = tx_ext, ty_ext
    features = np.concatenate([mats["allx"], tx], axis=0)
    labels = np.concatenate([mats["ally"], ty], axis=0)
    n = features.shape[0]
    if lo < mats["allx"].shape[0] or hi >= n:
        raise ValueError(
            f"{paths['test.index']} lists node ids in [{lo}, {hi}]; expected ids in "
            f"[{mats['allx'].shape[0]}, {n}) (after the {mats['allx'].shape[0]} rows of allx)"
        )
    # rows of tx follow the file order of test.index: move them to their node ids
    features[test_idx_reorder] = features[test_idx_range]
    labels[test_idx_reorder] = labels[test_idx_range]

    y = np.where(labels.sum(axis=1) > 0, labels.argmax(axis=1), -1).astype(np.int64)
    n_train = mats["x"].shape[0]
    if n_train + NUM_VAL > mats["allx"].shape[0]:
        raise ValueError(
            f"{paths['allx']} has {mats['allx'].shape[0]} rows; expected at least {n_train} training + "
            f"{NUM_VAL} validation nodes"
        )
    return GraphData(
        name=name,
        x=torch.from_numpy(features),
        y=torch.from_numpy(y),
        edge_index=edges_from_dict(graph, n, paths["graph"]),
        train_idx=torch.arange(n_train),
        val_idx=torch.arange(n_train, n_train + NUM_VAL),
        test_idx=torch.from_numpy(test_idx_range.copy()),
        num_classes=int(labels.shape[1]),
    )
