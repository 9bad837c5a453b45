"""Same module calls on every rank under DeepSpeed ZeRO and FSDP: a padding row holding every modality appended to
each training batch (:class:`RankPadder`) and masked out of the loss (:class:`PaddedPretrainer`)."""

from __future__ import annotations

import logging

import torch

from .pretraining import ContrastivePretrainer

logger = logging.getLogger(__name__)


class RankPadder:
    """Appends one padding sample holding *every* modality to each training batch, so that every rank makes the
    same module calls at every step whatever modalities its batch holds. :class:`PaddedPretrainer` masks the row
    out of the loss (all its views absent), so the loss and every gradient are exactly those of the real batch.

    Why: the backbone runs every present modality's embedder and one encoder pass per modality present in the
    local batch (its per-modality view), so ranks with different modalities make different calls. DDP copes
    (``find_unused_parameters``); DeepSpeed ZeRO does not: ZeRO-2/3 reduce gradients in buckets filled by
    per-parameter hooks (a parameter with a gradient on one rank and none on another mismatches the collectives:
    gloo "Received data size doesn't match expected size", NCCL a hang) and ZeRO-3 gathers a module's parameter
    shards in its forward hooks, once per call (a different number of encoder calls per rank hangs). FSDP gathers
    per wrapped block and call in the same way.

    The padding row takes each modality's arrays from the first training sample that has it (the same on every
    rank), cut or zero-padded to the batch's padded length so the real rows are left untouched."""

    PAD_ID = "__rank_padding__"

    def __init__(self, dataset, collator, names: list[str]):
        self.row: dict[str, dict[str, torch.Tensor]] = {}
        for i in range(len(dataset)):
            batch = collator([dataset[i]], train=False)
            for name, arrays in (batch or {}).get("inputs", {}).items():
                self.row.setdefault(name, arrays)
            if len(self.row) == len(names):
                break
        missing = sorted(set(names) - set(self.row))
        if missing:  # no training sample has them: no rank ever runs these embedders, which is consistent
            logger.warning("no training sample has %s: these embedders are never trained", missing)
        self._on_device: dict[torch.device, dict[str, dict[str, torch.Tensor]]] = {}

    def row_on(self, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
        """The padding row on ``device``, moved once per device and run rather than at every step."""
        if device not in self._on_device:
            self._on_device[device] = {n: {k: t.to(device) for k, t in a.items()} for n, a in self.row.items()}
        return self._on_device[device]

    @staticmethod
    def _fit(t: torch.Tensor, shape: torch.Size, key: str, name: str) -> torch.Tensor:
        """``t`` (one row) cut or zero-padded to ``shape`` beyond the batch dimension (zeros = absent tokens)."""
        if t.dim() != len(shape):
            raise ValueError(f"{name}.{key}: padding row has {t.dim()} dims, the batch {len(shape)}")
        if key == "pixel_values" and t.shape[1:] != shape[1:]:
            raise ValueError(f"{name}: images of shape {tuple(t.shape[1:])} and {tuple(shape[1:])} in one run")
        t = t[(slice(None), *(slice(0, n) for n in shape[1:]))]
        pad = [x for n, m in zip(reversed(shape[1:]), reversed(t.shape[1:]), strict=True) for x in (0, n - m)]
        return torch.nn.functional.pad(t, pad) if any(pad) else t

    def __call__(self, batch: dict) -> dict:
        n = len(batch["sample_id"])
        # the row was collated on CPU; the batch may already be on the GPU (accelerate's prepared loader)
        device = next((t.device for arrays in batch["inputs"].values() for t in arrays.values()), torch.device("cpu"))
        inputs = {}
        for name, pad in self.row_on(device).items():
            real = batch["inputs"].get(name)
            if real is None:  # nobody in the batch has it: n all-absent rows (values copied, masks False)
                real = {
                    k: torch.zeros_like(t[:1].expand(n, *t.shape[1:]))
                    if t.dtype == torch.bool or k == "attention_mask"
                    else t[:1].expand(n, *t.shape[1:]).clone()
                    for k, t in pad.items()
                }
            if set(real) != set(pad):
                raise ValueError(f"{name}: batch arrays {sorted(real)} but padding row {sorted(pad)}")
            inputs[name] = {k: torch.cat([real[k], self._fit(pad[k], real[k].shape, k, name)]) for k in real}
        return {**batch, "inputs": inputs, "patient_id": [*batch["patient_id"], self.PAD_ID]}


class PaddedPretrainer(ContrastivePretrainer):
    """:class:`ContrastivePretrainer` whose last ``num_pad`` batch rows (:class:`RankPadder`) run through the model
    but have no view in the loss: their modality (and leave-one-out) masks are cleared before the loss sees them.
    The backbone processes samples independently, so the real rows' views are unchanged.

    With ``subset_views`` the padding row (which holds every modality, the subset one included) makes every rank
    run the subset views' backbone call (and the reconstruction decoder) once per step; its subset views, their
    latents and its reconstruction error are masked out alike, and its token subsets are drawn from a forked
    generator after the real rows', so the real rows get exactly the draws (and the loss) of the unpadded run, at
    every step."""

    _num_pad = 0

    def forward(self, inputs, patient_id=None, num_pad: int = 0, **kwargs):
        self._num_pad = num_pad
        try:
            return super().forward(inputs, patient_id, **kwargs)
        finally:
            self._num_pad = 0

    def subset_masks(self, keep: torch.Tensor) -> torch.Tensor:
        # called on the rows holding the subset modality, the padding rows last (they hold every modality); theirs
        # are drawn from a forked generator, so the real rows' draws, now and at later steps, are the unpadded run's
        n = self._num_pad
        if not n:
            return super().subset_masks(keep)
        real = super().subset_masks(keep[:-n])
        with torch.random.fork_rng(devices=[keep.device] if keep.device.type == "cuda" else []):
            return torch.cat([real, super().subset_masks(keep[-n:])], dim=1)

    def _subset_views(self, inputs, with_latents: bool = True):
        sub = super()._subset_views(inputs, with_latents)
        if self._num_pad:
            real = torch.ones(len(sub["mask"]), dtype=torch.bool, device=sub["mask"].device)
            real[-self._num_pad :] = False
            sub["mask"] = sub["mask"] & real[:, None]
            for key in ("sse", "count"):  # times 0, not cut: the decoder keeps a (zero) gradient on every rank
                if key in sub:
                    sub[key] = sub[key] * real
        return sub

    def _encode(self, inputs):
        out = super()._encode(inputs)
        if self._num_pad:
            for key in ("modality_mask", "leave_one_out_mask"):
                if out.get(key) is not None:
                    m = out[key].clone()
                    m[-self._num_pad :] = False
                    out[key] = m
        return out
