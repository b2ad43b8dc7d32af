"""NadarayaWatson against the kernel-regression formulas of seed 003 (written out in float64 here), on d2l's
toy data y = 2 sin(x) + x^0.8 + noise."""

import math

import pytest
import torch

from attnkit.nn.pooling import NadarayaWatson


def toy_data(seed=0, n_train=50):
    """d2l's example: 50 sorted x in [0, 5), y = 2 sin(x) + x^0.8 + N(0, 0.5^2); test x = 0, 0.1, ..., 4.9."""
    g = torch.Generator().manual_seed(seed)
    x_train, _ = torch.sort(torch.rand(n_train, generator=g) * 5)
    f = lambda x: 2 * torch.sin(x) + x**0.8  # noqa: E731
    y_train = f(x_train) + torch.normal(0.0, 0.5, (n_train,), generator=g)
    x_test = torch.arange(0, 5, 0.1)
    return x_train, y_train, x_test, f(x_test)


def ref_nadaraya_watson(x_query, x_keys, y_values, w=None):
    """f(x) = sum_i K(x - x_i) y_i / sum_j K(x - x_j); Gaussian K(u) = exp(-(u w)^2 / 2); w None: average."""
    out = []
    for x in x_query.tolist():
        if w is None:
            k = [1.0 for _ in x_keys.tolist()]
        else:
            k = [math.exp(-(((x - xi) * w) ** 2) / 2) for xi in x_keys.tolist()]
        out.append(sum(ki * yi for ki, yi in zip(k, y_values.tolist(), strict=True)) / sum(k))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind, w", [("average", None), ("gaussian", 1.0), ("parametric", 3.0)])
def test_matches_kernel_regression_formula(kind, w):
    x_train, y_train, x_test, _ = toy_data()
    model = NadarayaWatson(kind)
    if kind == "parametric":
        with torch.no_grad():
            model.w.fill_(w)
    out, weights = model(x_test[None], x_train[None], y_train[None], return_weights=True)  # (1, 50), (1, 50, 50)
    assert out.shape == (1, 50) and weights.shape == (1, 50, 50)
    ref = ref_nadaraya_watson(x_test, x_train, y_train, w)
    torch.testing.assert_close(out[0].double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 50))
    if kind == "average":
        torch.testing.assert_close(out[0], y_train.mean().expand(50))


def test_float64_exact_and_per_query_keys():
    # d2l's training layout: each query has its own keys (the other training points) -> queries (n, 1)
    x_train, y_train, _, _ = toy_data(seed=1, n_train=12)
    x, y = x_train.double(), y_train.double()
    others = ~torch.eye(12, dtype=torch.bool)
    keys = x.repeat(12, 1)[others].reshape(12, 11)  # (n, n - 1)
    values = y.repeat(12, 1)[others].reshape(12, 11)  # (n, n - 1)
    out = NadarayaWatson("gaussian")(x[:, None], keys, values)  # (n, 1)
    ref = torch.stack([ref_nadaraya_watson(x[i : i + 1], keys[i], values[i], w=1.0) for i in range(12)])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_vector_queries_and_values():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    out = NadarayaWatson("gaussian")(q, k, v)
    ref = torch.empty(2, 3, 6, dtype=torch.float64)
    for b in range(2):
        for i in range(3):
            kern = [math.exp(-float(((q[b, i] - k[b, j]) ** 2).sum()) / 2) for j in range(5)]
            ref[b, i] = sum(kern[j] * v[b, j] for j in range(5)) / sum(kern)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # scalar queries with vector values (B, S, Dv)
    x = torch.rand(2, 4, generator=g, dtype=torch.float64)
    xs = torch.rand(2, 5, generator=g, dtype=torch.float64)
    out = NadarayaWatson("gaussian")(x, xs, v)
    assert out.shape == (2, 4, 6)
    for c in range(6):
        torch.testing.assert_close(out[1, :, c], ref_nadaraya_watson(x[1], xs[1], v[1, :, c], w=1.0))


def test_parametric_learns_well_below_average_pooling():
    # seed 003 / d2l: train w by SGD on the leave-one-out loss (lr 0.5, 5 epochs, summed squared error / 2)
    x_train, y_train, x_test, y_truth = toy_data()
    n = x_train.shape[0]
    others = ~torch.eye(n, dtype=torch.bool)
    keys = x_train.repeat(n, 1)[others].reshape(n, n - 1)  # (n, n - 1)
    values = y_train.repeat(n, 1)[others].reshape(n, n - 1)  # (n, n - 1)

    def train_mse(model):
        return ((model(x_train[:, None], keys, values)[:, 0] - y_train) ** 2).mean()

    average_loss = train_mse(NadarayaWatson("average")).item()
    net = NadarayaWatson("parametric")
    start_loss = train_mse(net).item()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        (((net(x_train[:, None], keys, values)[:, 0] - y_train) ** 2) / 2).sum().backward()
        opt.step()
    final_loss = train_mse(net).item()
    assert final_loss < 0.6 * start_loss
    assert final_loss < 0.5 * average_loss
    assert net.w.item() > 2.0  # the kernel got narrower
    # and the fitted curve is closer to the truth than average pooling on the test grid
    test_err = ((net(x_test[None], x_train[None], y_train[None])[0] - y_truth) ** 2).mean()
    avg_err = ((NadarayaWatson("average")(x_test[None], x_train[None], y_train[None])[0] - y_truth) ** 2).mean()
    assert test_err < 0.5 * avg_err


def test_only_parametric_has_parameters():
    assert list(NadarayaWatson("average").parameters()) == []
    assert list(NadarayaWatson("gaussian").parameters()) == []
    assert [p.shape for p in NadarayaWatson("parametric").parameters()] == [torch.Size([])]


@pytest.mark.parametrize(
    "call, exc, name",
    [
        (lambda: NadarayaWatson("cosine"), ValueError, "kind"),
        (lambda: NadarayaWatson()(torch.rand(4), torch.rand(2, 5), torch.rand(2, 5)), ValueError, "queries"),
        (lambda: NadarayaWatson()(torch.rand(2, 4), torch.rand(2, 5, 1), torch.rand(2, 5)), ValueError, "keys"),
        (lambda: NadarayaWatson()(torch.rand(2, 4, 3), torch.rand(2, 5, 2), torch.rand(2, 5, 1)), ValueError,
         "keys"),
        (lambda: NadarayaWatson()(torch.rand(2, 4), torch.rand(2, 5), torch.rand(2, 6)), ValueError, "values"),
        (lambda: NadarayaWatson()(torch.rand(2, 4, 3), torch.rand(2, 5, 3), torch.rand(2, 5)), ValueError,
         "values"),
        (lambda: NadarayaWatson()(torch.arange(4).reshape(1, 4), torch.rand(1, 5), torch.rand(1, 5)), TypeError,
         "queries"),
    ],
)
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()
