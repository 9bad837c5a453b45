"""Pre-tokenised shards (``bioperceiver.data.shards``): bit-exact round trip of processed samples, local and fsspec
(``memory://``), finished shards skipped on a re-run, every row once per epoch over any number of ranks and
DataLoader workers, a deterministic ``(seed, epoch)`` order, resume mid-epoch on another number of ranks with exactly
the remaining rows, a sharded pretraining run resumed bit-identically, and cached frozen-encoder features giving the
loss of the pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bioperceiver as bp
from bioperceiver.data import BioPerceiverCollator, BioPerceiverProcessor, assign_splits, read_manifest
from bioperceiver.data.shards import (
    ShardedDataset,
    _decode,
    epoch_order,
    frozen_feature_encoders,
    main,
    read_index,
    write_shards,
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A small synthetic cohort (every modality kind, 30% missing) with fitted processors."""
    from bioperceiver.data.recipes.synthetic import make_synthetic_cohort

    root = tmp_path_factory.mktemp("shards")
    path = make_synthetic_cohort(root / "cohort", num_patients=24, missing_rate=0.3, seed=3, image_size=16)
    manifest = assign_splits(read_manifest(path))
    settings = {
        "text_note": {"vocab_size": 100, "min_frequency": 1, "max_length": 24},
        "image_2d": {"spatial_size": [16, 16]},
        "image_3d": {"spatial_dims": 3, "spatial_size": [8, 8, 8]},
        "signal_ecg": {"target_rate": 50.0, "window_s": 2.0},
    }
    processor = BioPerceiverProcessor.from_manifest(manifest, settings).fit(manifest, split="train")
    processor.save_pretrained(root / "processors")
    return root, path, manifest, processor


def all_rows(ds: ShardedDataset) -> list[str]:
    """The sample ids ``ds`` yields, in order."""
    return [s["sample_id"] for s in ds]


def test_round_trip_is_bit_exact_and_rerun_skips_finished_shards(cohort, tmp_path, monkeypatch):
    _, _, manifest, processor = cohort
    out = tmp_path / "shards"
    index = write_shards(manifest, processor, out, rows_per_shard=5, row_group_size=2, seed=7)
    records = manifest.split("train").records()
    assert index["num_rows"] == len(records) and len(index["shards"]) == -(-len(records) // 5)
    ds = ShardedDataset(out, batch_size=1, shuffle=False, drop_last=False)
    got = list(ds)
    assert [s["sample_id"] for s in got] == [r["sample_id"] for r in records]
    for i, (sample, record) in enumerate(zip(got, records, strict=True)):
        want = processor(record, base_dir=manifest.base_dir, train=False, rng=np.random.default_rng([7, i]))
        for name in processor.processors:
            if want.get(name) is None:
                assert sample[name] is None, (i, name)
                continue
            assert sample[name].keys() == want[name].keys()
            for key, arr in want[name].items():
                assert sample[name][key].dtype == np.asarray(arr).dtype and np.array_equal(sample[name][key], arr)
    # a re-run with the same settings processes nothing and gives the same content hash
    calls = []
    monkeypatch.setattr(BioPerceiverProcessor, "__call__", lambda *a, **k: calls.append(1))
    again = write_shards(manifest, processor, out, rows_per_shard=5, row_group_size=2, seed=7)
    assert not calls and again["content_hash"] == index["content_hash"]
    with pytest.raises(ValueError, match="rows_per_shard"):
        write_shards(manifest, processor, out, rows_per_shard=4, row_group_size=2, seed=7)


def test_memory_url_equals_local_folder_and_the_command_line(cohort, tmp_path):
    root, path, manifest, processor = cohort
    assert (
        main(
            [
                "write",
                "--manifest",
                str(path),
                "--processors",
                str(root / "processors"),
                "--output",
                str(tmp_path / "local"),
                "--rows_per_shard",
                "4",
            ]
        )
        == 0
    )
    write_shards(manifest, processor, "memory://bp-test/shards", rows_per_shard=4)
    local, mem = read_index(tmp_path / "local"), read_index("memory://bp-test/shards")
    assert local["content_hash"] == mem["content_hash"]
    a = list(ShardedDataset(tmp_path / "local", batch_size=3, seed=1, shuffle_buffer=4))
    b = list(ShardedDataset("memory://bp-test/shards", batch_size=3, seed=1, shuffle_buffer=4))
    file_url = list(ShardedDataset(f"file://{tmp_path / 'local'}", batch_size=3, seed=1, shuffle_buffer=4))
    assert [s["sample_id"] for s in a] == [s["sample_id"] for s in b] == [s["sample_id"] for s in file_url]
    assert all(s["__view_seed__"] == t["__view_seed__"] for s, t in zip(a, b, strict=True))


def test_epoch_order_is_a_seeded_permutation_with_a_bounded_buffer():
    counts = [7, 3, 9, 5]
    a = epoch_order(counts, seed=1, epoch=0, shuffle=True, shuffle_buffer=4)
    assert sorted(a.tolist()) == list(range(24))
    assert np.array_equal(a, epoch_order(counts, seed=1, epoch=0, shuffle=True, shuffle_buffer=4))
    assert not np.array_equal(a, epoch_order(counts, seed=1, epoch=1, shuffle=True, shuffle_buffer=4))
    assert not np.array_equal(a, epoch_order(counts, seed=2, epoch=0, shuffle=True, shuffle_buffer=4))
    # the buffer bounds how far a row moves ahead of its place in the (shard-shuffled) stream
    stream = epoch_order(counts, seed=1, epoch=0, shuffle=True, shuffle_buffer=1)
    where = {int(r): p for p, r in enumerate(a)}
    assert all(where[int(r)] >= p - 4 for p, r in enumerate(stream))
    assert epoch_order(counts, 1, 0, shuffle=False, shuffle_buffer=4).tolist() == list(range(24))


@pytest.fixture(scope="module")
def shard_dir(cohort, tmp_path_factory):
    _, _, manifest, processor = cohort
    out = tmp_path_factory.mktemp("stream") / "shards"
    write_shards(manifest, processor, out, rows_per_shard=4, row_group_size=2)
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_together_yield_every_row_once_per_epoch(shard_dir, world):
    per_rank = [
        all_rows(
            ShardedDataset(shard_dir, batch_size=2, rank=r, world_size=world, seed=4, shuffle_buffer=3, drop_last=False)
        )
        for r in range(world)
    ]
    n = read_index(shard_dir)["num_rows"]
    flat = [s for rows in per_rank for s in rows]
    assert len(flat) == n and len(set(flat)) == n
    # drop_last: every rank the same number of full batches
    kept = [
        len(all_rows(ShardedDataset(shard_dir, batch_size=2, rank=r, world_size=world, seed=4))) for r in range(world)
    ]
    assert len(set(kept)) == 1 and kept[0] == (n // (2 * world)) * 2


@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_on_another_number_of_ranks_yields_exactly_the_remaining_rows(shard_dir, new_world):
    """Two ranks consume 2 global steps; the saved state resumed on 1 or 3 ranks yields every other row of the
    epoch exactly once: none repeated, none lost."""
    batch, steps = 2, 2
    ranks = [
        ShardedDataset(shard_dir, batch_size=batch, rank=r, world_size=2, seed=9, shuffle_buffer=5, drop_last=False)
        for r in range(2)
    ]
    for ds in ranks:
        ds.set_epoch(1)
    seen = []
    for ds in ranks:
        seen += all_rows(ds)[: steps * batch]
    for ds in ranks:
        for _ in range(steps):
            ds.advance(batch * 2)
    state = ranks[0].state_dict()
    assert state["position"] == steps * batch * 2 and state == ranks[1].state_dict()
    resumed = []
    for r in range(new_world):
        ds = ShardedDataset(
            shard_dir, batch_size=batch, rank=r, world_size=new_world, seed=9, shuffle_buffer=5, drop_last=False
        )
        ds.load_state_dict(state)
        resumed += all_rows(ds)
    full = all_rows(_epoch(shard_dir, 1))  # the whole epoch in its global order (one rank, one worker)
    assert len(set(seen)) == len(seen) and not set(seen) & set(resumed)
    assert sorted(seen + resumed) == sorted(full) and len(resumed) == len(set(resumed))
    assert set(seen) == set(full[: steps * batch * 2])  # the consumed rows are the prefix of the global order


def _epoch(shard_dir, epoch):
    ds = ShardedDataset(shard_dir, batch_size=1, seed=9, shuffle_buffer=5, drop_last=False)
    ds.set_epoch(epoch)
    return ds


def test_dataloader_workers_give_the_batches_of_one_process(shard_dir, cohort):
    processor = cohort[3]
    collator = BioPerceiverCollator(processor.modalities, modality_dropout=0.3, seed=2)

    def batches(workers):
        ds = ShardedDataset(shard_dir, batch_size=3, seed=5, shuffle_buffer=4)
        loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collator, num_workers=workers)
        return [b["sample_id"] for b in loader], [b["inputs"] for b in loader]

    (ids0, in0), (ids2, in2) = batches(0), batches(2)
    assert ids0 == ids2 and len(ids0) == read_index(shard_dir)["num_rows"] // 3
    for a, b in zip(in0, in2, strict=True):  # modality dropout from __view_seed__: the same in every process
        assert a.keys() == b.keys()
        for name in a:
            for key in a[name]:
                assert torch.equal(a[name][key], b[name][key])


def test_load_state_refuses_other_shards(shard_dir):
    ds = ShardedDataset(shard_dir, batch_size=2)
    with pytest.raises(ValueError, match="content hash"):
        ds.load_state_dict({"epoch": 0, "position": 4, "content_hash": "0" * 64})


def test_decode_keeps_absent_modalities_absent():
    rec = {"sample_id": "s", "patient_id": "p", "m/x": None, "m/x/shape": None, "m/x/dtype": None}
    assert _decode(rec, {"m": ["x"]})["m"] is None


# ---- cached frozen features ------------------------------------------------------------------------------------
def test_cached_frozen_image_features_give_the_loss_of_the_pixels(cohort, tmp_path):
    """An image embedder with a frozen timm backbone: the shards store the backbone's outputs instead of pixels;
    the pretraining step on them gives the loss (and gradients) of the step on the pixels."""
    import timm
    from safetensors.torch import save_file

    import bioperceiver as bp
    from bioperceiver.data.shards import check_cached_features
    from bioperceiver.training.pretraining import ContrastivePretrainer

    _, _, manifest, processor = cohort
    ref = timm.create_model("resnet10t", pretrained=False, num_classes=0, global_pool="", in_chans=1)
    weights = tmp_path / "resnet10t.safetensors"
    save_file(ref.state_dict(), str(weights))
    image = {"mode": "timm", "backbone": "resnet10t", "backbone_weights": str(weights), "freeze_backbone": True}
    modalities = processor.model_modalities({"image_2d": image})
    torch.manual_seed(0)
    model = bp.create_model("bioperceiver_debug", modalities=modalities)
    encoders = frozen_feature_encoders(model)
    assert list(encoders) == ["image_2d"]
    write_shards(manifest, processor, tmp_path / "pixels", rows_per_shard=6)
    write_shards(manifest, processor, tmp_path / "features", rows_per_shard=6, feature_encoders=encoders)
    index = read_index(tmp_path / "features")
    check_cached_features(index, model, cached_features=True)
    with pytest.raises(ValueError, match="cached_features=true"):
        check_cached_features(index, model, cached_features=False)
    assert "backbone_features" in index["arrays"]["image_2d"] and "pixel_values" not in index["arrays"]["image_2d"]
    torch.manual_seed(1)
    other = bp.create_model(
        "bioperceiver_debug", modalities=processor.model_modalities({"image_2d": {**image, "backbone_weights": None}})
    )
    with pytest.raises(ValueError, match="weights"):
        check_cached_features(index, other, cached_features=True)

    collator = BioPerceiverCollator(processor.modalities, modality_dropout=0.3, seed=0)
    trainer = ContrastivePretrainer(model, loss="clip").train()

    def step(folder):
        ds = ShardedDataset(folder, batch_size=8, seed=3)
        batch = collator(list(ds)[:8])
        trainer.zero_grad()
        out = trainer(batch["inputs"], batch["patient_id"])
        out["loss"].backward()
        grads = {k: p.grad.clone() for k, p in trainer.named_parameters() if p.grad is not None}
        return batch, out["loss"].detach(), grads

    _, pix_loss, pix_grads = step(tmp_path / "pixels")
    feat_batch, feat_loss, feat_grads = step(tmp_path / "features")
    assert "image_2d" in feat_batch["inputs"] and "backbone_features" in feat_batch["inputs"]["image_2d"]
    assert feat_batch["inputs"]["image_2d"]["present"].any()
    torch.testing.assert_close(feat_loss, pix_loss, rtol=1e-5, atol=1e-6)
    assert feat_grads.keys() == pix_grads.keys()
    for k in pix_grads:
        torch.testing.assert_close(feat_grads[k], pix_grads[k], rtol=1e-4, atol=1e-6, msg=k)


# ---- pretraining -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sharded_pretraining_run_resumes_bit_identically(tmp_path, monkeypatch):
    """``data.shards``: a run killed right after a checkpoint and resumed from it ends with exactly the parameters
    of the uninterrupted run (the stream's position is in the checkpoint); the card says the run read shards."""
    from conftest import synthetic_run_config
    from safetensors.torch import load_file

    from bioperceiver.training import load_run_config, loop

    path = synthetic_run_config(
        tmp_path, max_steps=5, warmup_steps=1, batch_size=8, save_steps=2, keep_last=3, eval={"n_bootstrap": 0}
    )
    cfg = load_run_config(path, [f"output_dir={tmp_path / 'prep'}"])
    manifest, processor, _ = loop.prepare_data(cfg, _OneProcess(), tmp_path / "prep")
    shards = tmp_path / "shards"
    index = write_shards(manifest, processor, shards, rows_per_shard=7, seed=cfg.seed)
    assert index["num_rows"] < 5 * 8  # 5 steps of 8 cross an epoch boundary
    extra = [f"data.shards={shards}", "data.shard_shuffle_buffer=6"]

    def run(name, **kwargs):
        import logging

        logging.getLogger("bioperceiver").setLevel(logging.WARNING)
        c = load_run_config(path, [f"output_dir={tmp_path / name}", *extra])
        return loop.run_pretraining(c, **kwargs)

    run("full")

    class Killed(Exception):
        pass

    def kill(pid, sig):
        raise Killed

    monkeypatch.setattr(loop.os, "kill", kill)
    with pytest.raises(Killed):
        run("crash", crash_after_step=2)
    monkeypatch.undo()
    import json

    state = json.loads((tmp_path / "crash/checkpoints/checkpoint-2/trainer_state.json").read_text())
    assert state["data_state"]["position"] == 16 and state["data_state"]["content_hash"] == index["content_hash"]
    run("crash", resume="latest")
    ckpt = "checkpoints/checkpoint-5/model.safetensors"
    a, b = (load_file(tmp_path / n / ckpt) for n in ("full", "crash"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    card = (tmp_path / "full/final/README.md").read_text()
    assert "pre-tokenised shards" in card


def test_shards_written_with_other_processors_are_refused(tmp_path):
    """Shards hold processed tokens: a run whose processors differ (here the image size) from the ones the shards
    were written with is refused before training, not trained on tokens its processors never produce."""
    from conftest import synthetic_run_config

    from bioperceiver.training import RunConfigError, load_run_config, loop

    path = synthetic_run_config(tmp_path, max_steps=1, warmup_steps=1, batch_size=4, save_steps=1, keep_last=1)
    cfg = load_run_config(path, [f"output_dir={tmp_path / 'prep'}"])
    manifest, processor, _ = loop.prepare_data(cfg, _OneProcess(), tmp_path / "prep")
    write_shards(manifest, processor, tmp_path / "shards", rows_per_shard=16, split="train", seed=cfg.seed)
    other = BioPerceiverProcessor.from_pretrained(tmp_path / "processors")
    other.processors["image_2d"].settings.spatial_size = [8, 8]
    model = bp.create_model("bioperceiver_debug", modalities=processor.model_modalities({}))
    shard_cfg = load_run_config(path, [f"output_dir={tmp_path / 'run'}", f"data.shards={tmp_path / 'shards'}"])

    class World(_OneProcess):
        process_index, num_processes = 0, 1

    assert loop.sharded_training_data(shard_cfg, World(), processor, model, pad_ranks=False) is not None
    with pytest.raises(RunConfigError, match="written with other processors"):
        loop.sharded_training_data(shard_cfg, World(), other, model, pad_ranks=False)


class _OneProcess:
    is_main_process = True

    def wait_for_everyone(self):
        pass


def test_run_config_resolves_a_relative_shard_folder_and_keeps_urls(tmp_path):
    from bioperceiver.training import load_run_config

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "run.yaml").write_text("data:\n  shards: ../shards/train\n")
    cfg = load_run_config(tmp_path / "conf" / "run.yaml")
    assert cfg.data.shards == str(tmp_path / "shards" / "train")
    cfg = load_run_config(tmp_path / "conf" / "run.yaml", ["data.shards=s3://bucket/shards"])
    assert cfg.data.shards == "s3://bucket/shards" and cfg.data.cached_features is False


def test_advancing_while_iterating_does_not_move_the_blocks_to_come(shard_dir):
    """The training loop calls ``advance`` after every global step while it iterates the same object (DataLoader
    with ``num_workers=0``): the rank still yields exactly its blocks of the epoch. Before, the generator read the
    moving position, so every second block was skipped and the last one repeated."""
    batch, world = 2, 2
    ds = ShardedDataset(shard_dir, batch_size=batch, rank=1, world_size=world, seed=4, shuffle_buffer=3)
    want = all_rows(ds)
    got = []
    for i, sample in enumerate(ds):
        got.append(sample["sample_id"])
        if i % batch == batch - 1:
            ds.advance(batch * world)  # one global step consumed
    assert got == want and ds.position == len(want) * world
