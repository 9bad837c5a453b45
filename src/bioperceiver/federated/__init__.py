"""Federated pretraining and finetuning across sites with Flower: no raw record leaves its site.

- :mod:`.client`: :class:`SiteClient` (local training of the global model, FedProx term, client-side update
  clipping and noise) and :class:`LocalTrainingConfig`.
- :mod:`.simulation`: :func:`run_federated` (Flower's FedAvg/FedProx over in-process ``ClientApp`` sites, round
  checkpoints with exact resume, per-site and global metrics, a PNG of metrics vs round).
- :mod:`.sites`: sites from a manifest's ``site`` column or one manifest per site; what each site contributed.
- :mod:`.processors`: processors fitted from per-site summaries (vocabulary unions, summed sufficient statistics).
- :mod:`.app`: the ``ClientApp``/``ServerApp`` a site and a coordinator run outside simulation.
"""

from .client import LocalTrainingConfig, SiteClient, load_arrays, round_seed, state_to_numpy
from .simulation import (
    STRATEGIES,
    FederatedConfig,
    FederatedResult,
    InProcessGrid,
    build_strategy,
    latest_round,
    make_client_app,
    plot_federated_history,
    run_federated,
)

__all__ = [
    "STRATEGIES",
    "FederatedConfig",
    "FederatedResult",
    "InProcessGrid",
    "LocalTrainingConfig",
    "SiteClient",
    "build_strategy",
    "latest_round",
    "load_arrays",
    "make_client_app",
    "plot_federated_history",
    "round_seed",
    "run_federated",
    "state_to_numpy",
]
