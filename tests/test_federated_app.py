"""The deployment apps (bioperceiver.federated.app): the coordinator's ServerApp main and the sites' ClientApp,
exchanging real Flower messages in process; the result equals the simulation's."""

import json

import pytest
import torch
from flwr.app import Context, RecordDict

from bioperceiver.data.manifest import read_manifest, write_manifest
from bioperceiver.data.recipes.synthetic import make_synthetic_cohort
from bioperceiver.federated import FederatedConfig, InProcessGrid, LocalTrainingConfig, SiteClient, run_federated
from bioperceiver.federated.app import client_app, processor_from_json, processor_to_json, server_main
from bioperceiver.federated.runs import federated_processor, load_sites, pretraining_objective
from bioperceiver.federated.simulation import _identity


@pytest.fixture(scope="module")
def site_manifests(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    path = make_synthetic_cohort(root / "cohort", num_patients=10, missing_rate=0.2, seed=3)
    full = read_manifest(path)
    keep = ["sample_id", "patient_id", "tabular_ehr", "text_note"]
    paths = []
    for k, name in enumerate(["north", "south"]):
        table = full.table[keep].iloc[k::2].reset_index(drop=True)
        table["split"] = ["validation" if i % 4 == 3 else "train" for i in range(len(table))]
        p = root / "cohort" / f"{name}.parquet"
        write_manifest(table, p)
        paths.append(f"{name}={p}")
    (root / "settings.yaml").write_text(
        json.dumps({"processors": {"text_note": {"vocab_size": 100, "min_frequency": 1}}})
    )
    return paths, str(root / "settings.yaml")


def test_server_app_and_client_apps_equal_the_simulation(site_manifests, tmp_path):
    paths, settings = site_manifests
    _identity()
    run = {
        "rounds": 2,
        "local-steps": 1,
        "batch-size": 4,
        "learning-rate": 0.01,
        "seed": 1,
        "processor-settings": settings,
        "output-dir": str(tmp_path / "deployed"),
    }
    nodes = [{"manifest": p.split("=", 1)[1], "site": p.split("=", 1)[0]} for p in paths]
    grid = InProcessGrid(client_app, [n["site"] for n in nodes], nodes, run)
    server_ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run)
    results = server_main(grid, server_ctx)
    assert [c["site"] for c in results["sites"]] == ["north", "south"]

    # the same run in simulation: processors from the same statistics, the same clients and rounds
    sites = load_sites(None, "meta_site", paths)
    processor, embedders = federated_processor(sites, settings, None)
    deployed_proc = processor_from_json(processor_to_json(processor))
    for name, proc in processor.processors.items():
        assert json.dumps(proc.state, sort_keys=True) == json.dumps(
            deployed_proc.processors[name].state, sort_keys=True
        )
    from bioperceiver.data.collator import BioPerceiverCollator
    from bioperceiver.data.dataset import ManifestDataset
    from bioperceiver.federated.app import pretraining_model

    local = LocalTrainingConfig(local_steps=1, batch_size=4, learning_rate=0.01, seed=1)
    clients = [
        SiteClient(
            name,
            ManifestDataset.from_manifest(m.split("train"), processor, train=True, seed=1, on_error="skip"),
            lambda: pretraining_model(processor, embedders, run),
            pretraining_objective,
            collate_fn=BioPerceiverCollator(processor.modalities, on_error="skip", seed=1),
            config=local,
        )
        for name, m in sites.items()
    ]
    model = pretraining_model(processor, embedders, run)
    sim = run_federated(clients, model.state_dict(), FederatedConfig(rounds=2, seed=1, fraction_evaluate=0.0))
    from transformers import AutoModel

    import bioperceiver  # noqa: F401  (registers the Auto classes)

    deployed = AutoModel.from_pretrained(tmp_path / "deployed")
    for k, v in deployed.state_dict().items():
        torch.testing.assert_close(v, sim.state[f"model.{k}"], rtol=0, atol=0)
    assert (tmp_path / "deployed" / "README.md").read_text().count("north") >= 1
