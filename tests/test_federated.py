"""Federated training (bioperceiver.federated): equivalences with centralised training, FedProx, resume."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bioperceiver.federated import FederatedConfig, LocalTrainingConfig, SiteClient, latest_round, run_federated


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _objective(model, batch):
    x, y = batch
    return F.mse_loss(model(x).squeeze(-1), y)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(1) + 0.1 * torch.randn(n, generator=g))


def _client(name, data, **local):
    cfg = LocalTrainingConfig(**{"batch_size": 4, "learning_rate": 0.05, **local})
    return SiteClient(name, data, _model, _objective, eval_dataset=data, config=cfg)


def _initial():
    return _model().state_dict()


def test_one_client_equals_centralised_training_exactly():
    data = _data(12, 1)
    steps = 5  # over more than one pass (3 batches a pass)
    result = run_federated(
        [_client("a", data, local_steps=steps, shuffle=False, optimizer="adamw")],
        _initial(),
        FederatedConfig(rounds=1, fraction_evaluate=0.0),
    )
    ref = _model()
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
    done = 0
    while done < steps:
        for batch in loader:
            loss = _objective(ref, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    for k, v in ref.state_dict().items():
        assert torch.equal(result.state[k], v), k
    assert result.history[0]["sites"]["a"]["steps"] == steps


def test_two_clients_with_half_batches_equal_one_centralised_sgd_step():
    data = _data(8, 2)
    x, y = data.tensors
    halves = [torch.utils.data.TensorDataset(x[:4], y[:4]), torch.utils.data.TensorDataset(x[4:], y[4:])]
    clients = [_client(n, d, local_steps=1, optimizer="sgd", shuffle=False) for n, d in zip("ab", halves)]
    result = run_federated(clients, _initial(), FederatedConfig(rounds=1, fraction_evaluate=0.0))
    ref = _model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    loss = _objective(ref, (x, y))  # the mean over the whole batch of 8
    opt.zero_grad()
    loss.backward()
    opt.step()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(result.state[k], v, rtol=0, atol=1e-6)
    assert not torch.equal(result.state["0.weight"], _initial()["0.weight"])  # it trained


def test_sites_are_weighted_by_their_number_of_samples():
    data = _data(12, 3)
    x, y = data.tensors
    parts = [torch.utils.data.TensorDataset(x[:4], y[:4]), torch.utils.data.TensorDataset(x[4:], y[4:])]
    clients = [_client(n, d, local_steps=1, optimizer="sgd", shuffle=False, batch_size=8) for n, d in zip("ab", parts)]
    result = run_federated(clients, _initial(), FederatedConfig(rounds=1, fraction_evaluate=0.0))
    ref = _model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    # one local step on each whole site: the 4/12 and 8/12 weighted mean of the two site gradients
    loss = (4 * _objective(ref, (x[:4], y[:4])) + 8 * _objective(ref, (x[4:], y[4:]))) / 12
    loss.backward()
    opt.step()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(result.state[k], v, rtol=0, atol=1e-6)


def _two_sites(**local):
    return [_client("a", _data(10, 4), **local), _client("b", _data(6, 5), **local)]


def test_fedprox_with_mu_zero_equals_fedavg_and_mu_pulls_towards_the_global_model():
    local = {"local_epochs": 2}
    avg = run_federated(_two_sites(**local), _initial(), FederatedConfig(rounds=2))
    prox_cfg = FederatedConfig(strategy="fedprox", proximal_mu=0.0, rounds=2)
    prox0 = run_federated(_two_sites(**local), _initial(), prox_cfg)
    for k in avg.state:
        assert torch.equal(avg.state[k], prox0.state[k]), k
    assert avg.history == prox0.history
    start = _initial()
    moved = {}
    for mu in (0.0, 10.0):
        r = run_federated(_two_sites(**local), start, FederatedConfig(strategy="fedprox", proximal_mu=mu, rounds=1))
        moved[mu] = sum(float((r.state[k] - start[k]).norm() ** 2) for k in start) ** 0.5
    assert moved[10.0] < moved[0.0]


def test_resume_from_a_round_checkpoint_equals_an_uninterrupted_run(tmp_path):
    cfg = FederatedConfig(rounds=3, seed=7, fraction_fit=0.5)  # one of two sites sampled per round
    full = run_federated(_two_sites(), _initial(), cfg, output_dir=tmp_path / "full")
    part = tmp_path / "part"
    run_federated(_two_sites(), _initial(), cfg, output_dir=part, stop_after=2)
    assert latest_round(part).name == "round-0002"
    resumed = run_federated(_two_sites(), _initial(), cfg, output_dir=part, resume=True)
    for k in full.state:
        assert torch.equal(full.state[k], resumed.state[k]), k
    assert json.loads(json.dumps(full.history)) == resumed.history
    assert [len(h["train"]) > 0 for h in full.history] == [True] * 3
    assert all(len([s for s in h["sites"] if "train_loss" in h["sites"][s]]) == 1 for h in full.history)
    assert (part / "federated_metrics.png").stat().st_size > 0
    with pytest.raises(ValueError, match="settings changed"):
        run_federated(
            _two_sites(), _initial(), FederatedConfig(rounds=3, seed=8, fraction_fit=0.5), output_dir=part, resume=True
        )


def test_client_side_update_clipping_bounds_the_update():
    start = _initial()
    clients = [_client("a", _data(8, 6), local_epochs=3, clip_update_norm=0.01)]
    r = run_federated(clients, start, FederatedConfig(rounds=1))
    norm = sum(float((r.state[k] - start[k]).norm() ** 2) for k in start) ** 0.5
    assert norm == pytest.approx(0.01, rel=1e-4)
    assert r.history[0]["sites"]["a"]["update_clipped"] == 1.0
    noisy = run_federated(
        [_client("a", _data(8, 6), local_epochs=3, clip_update_norm=0.01, noise_multiplier=1.0)],
        start,
        FederatedConfig(rounds=1),
    )
    assert not torch.equal(noisy.state["0.weight"], r.state["0.weight"])
    with pytest.raises(ValueError, match="clip_update_norm"):
        LocalTrainingConfig(noise_multiplier=1.0)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="fedprox"):
        FederatedConfig(strategy="fedavg", proximal_mu=0.1)
    with pytest.raises(ValueError, match="strategy"):
        FederatedConfig(strategy="scaffold")
    with pytest.raises(ValueError, match="unique"):
        run_federated([_client("a", _data(4, 1)), _client("a", _data(4, 2))], _initial(), FederatedConfig())
