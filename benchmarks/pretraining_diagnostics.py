"""Why does contrastive pretraining not pay off? Diagnostics of a pretrained backbone vs the same architecture
randomly initialised, on held-out patients (issue 18). No training: embeddings, cheap probes and counts.

What it measures (``--output_dir/diagnostics.json`` + PNGs):

* **representation health** of the fused and per-modality embeddings of the ``--split`` rows: effective rank
  (Roy & Vetterli 2007: exp of the entropy of the normalised singular values) and the singular-value spectrum,
  alignment and uniformity (Wang & Isola 2020) of L2-normalised embeddings (alignment between the two modality
  views of the same sample), mean cosine between random pairs (near 1 = collapse);
* **what the embeddings carry**: a scikit-learn probe on frozen embeddings, fitted on ``train`` rows and scored on
  ``--split`` rows with a patient-bootstrap 95% interval. Multi-label findings (a list-valued ``label_*`` column):
  logistic regression per finding against TF-IDF + LR on the same rows' text and the best *single* TF-IDF feature
  (chosen on train, scored on test: how lexical the labels are). Survival (``label_survival_time`` / ``_event``):
  a ridge Cox on the embedding's top principal components per ``meta_source`` cohort against a ridge Cox on the
  clinical fields;
* **the pretraining signal**: training and held-out loss from ``history.json`` against ln(batch size) (the loss of
  a uniform guess), and per text modality tokens per row, ``[UNK]`` rate, truncation rate and vocabulary use
  under the fitted processors.

Commands that produced ``benchmarks/RESULTS.md`` ("Why pretraining does not pay here (yet)")::

    nice -n 10 python benchmarks/pretraining_diagnostics.py --pretrained_dir /work/evidence/padchest/pretrain/final \
        --manifest /work/evidence/padchest/label_efficiency/labelled.parquet --split test \
        --output_dir /work/evidence/why18/padchest
    nice -n 10 python benchmarks/pretraining_diagnostics.py --pretrained_dir /work/evidence/survset/pretrain/final \
        --manifest /work/evidence/survset/dev_cohort/manifest.parquet --split validation,test \
        --output_dir /work/evidence/why18/survset
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger("pretraining_diagnostics")


# ----------------------------------------------------------------------------------------------- metric functions
def singular_values(x: np.ndarray) -> np.ndarray:
    """Singular values of the mean-centred ``x`` (N, D), largest first."""
    x = np.asarray(x, dtype=np.float64)
    return np.linalg.svd(x - x.mean(0, keepdims=True), compute_uv=False)


def effective_rank(x: np.ndarray | None = None, *, spectrum: np.ndarray | None = None) -> float:
    """Roy & Vetterli's effective rank: ``exp(H(p))`` with ``p = s / sum(s)`` over the singular values ``s`` of the
    centred ``x`` (or of a given ``spectrum``). Equals k for k equal non-zero singular values, 1 for rank one."""
    s = singular_values(x) if spectrum is None else np.asarray(spectrum, dtype=np.float64)
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def alignment(x: np.ndarray, y: np.ndarray, alpha: float = 2.0) -> float:
    """Wang & Isola's alignment ``E ||f(x) - f(y)||^alpha`` over positive pairs (rows of ``x`` and ``y``),
    on L2-normalised embeddings: 0 = positives identical, 4 = opposite (alpha 2)."""
    d = np.linalg.norm(l2_normalize(x) - l2_normalize(y), axis=1)
    return float(np.mean(d**alpha))


def uniformity(x: np.ndarray, t: float = 2.0, max_rows: int = 4000, seed: int = 0) -> float:
    """Wang & Isola's uniformity ``log E exp(-t ||f(x) - f(y)||^2)`` over distinct pairs of L2-normalised rows
    (a seeded subsample of ``max_rows``): 0 = all rows equal (collapse), more negative = more spread."""
    z = l2_normalize(x)
    if len(z) > max_rows:
        z = z[np.random.default_rng(seed).choice(len(z), max_rows, replace=False)]
    sq = np.maximum(2.0 - 2.0 * z @ z.T, 0.0)  # squared distances of unit vectors
    iu = np.triu_indices(len(z), k=1)
    v = -t * sq[iu]
    m = v.max()
    return float(m + np.log(np.mean(np.exp(v - m))))


def mean_random_cosine(x: np.ndarray, n_pairs: int = 20000, seed: int = 0) -> float:
    """Mean cosine similarity of random pairs of distinct rows (near 1: every row points the same way)."""
    z = l2_normalize(x)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(z), n_pairs)
    j = rng.integers(0, len(z), n_pairs)
    keep = i != j
    return float(np.mean((z[i[keep]] * z[j[keep]]).sum(1)))


def health(x: np.ndarray) -> dict:
    s = singular_values(x)
    return {
        "rows": len(x),
        "dim": int(x.shape[1]),
        "effective_rank": effective_rank(spectrum=s),
        "top1_variance_share": float(s[0] ** 2 / max((s**2).sum(), 1e-30)),
        "uniformity": uniformity(x),
        "mean_random_cosine": mean_random_cosine(x),
        "singular_values": [float(v) for v in s],
    }


# ------------------------------------------------------------------------------------------------------- embedding
def load_models(pretrained_dir: str, seed: int):
    """The pretrained backbone and the same architecture from a seeded random init (same processors)."""
    import torch

    from bioperceiver.inference.loading import LoadedModel, load_model_folder

    pre = load_model_folder(pretrained_dir, device="cpu")
    torch.manual_seed(seed)
    rand_model = type(pre.backbone)(pre.backbone.config).eval()
    rand = LoadedModel(rand_model, pre.processor, pre.modalities, None, pre.folder, dict(pre.info))
    return pre, rand


def embed(loaded, records: list[dict], base_dir) -> dict[str, np.ndarray]:
    """``{"ids": sample ids, "fused": (N, D), <modality>: (N, D) with NaN rows where absent}``."""
    from bioperceiver.inference.embedding import embedding_column, embedding_rows

    rows = list(embedding_rows(loaded, records, base_dir=base_dir, batch_size=64))
    out = {"ids": np.array([r["sample_id"] for r in rows]), "fused": np.stack([r["embedding"] for r in rows])}
    dim = out["fused"].shape[1]
    for m in loaded.modalities:
        col = embedding_column(m)
        out[m] = np.stack([r[col] if r[col] is not None else np.full(dim, np.nan, np.float32) for r in rows])
    return out


def representation(emb: dict, modalities: list[str]) -> dict:
    res = {"fused": health(emb["fused"])}
    for m in modalities:
        x = emb[m][~np.isnan(emb[m]).any(1)]
        if len(x) > 2:
            res[m] = health(x)
    for i, a in enumerate(modalities):
        for b in modalities[i + 1 :]:
            both = ~np.isnan(emb[a]).any(1) & ~np.isnan(emb[b]).any(1)
            if both.sum() > 2:
                res[f"alignment/{a}-{b}"] = {
                    "pairs": int(both.sum()),
                    "alignment": alignment(emb[a][both], emb[b][both]),
                    # the same with the pairs shuffled: what alignment is when positives carry no match
                    "alignment_shuffled": alignment(emb[a][both], np.random.default_rng(0).permutation(emb[b][both])),
                }
    return res


# ---------------------------------------------------------------------------------------------------------- probes
def patient_bootstrap(score_fn, groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``score_fn(index)`` over patient-level resamples (NaN where a resample lacks both classes / any event).
    The same ``seed`` and ``groups`` give the same resamples, so two models' draws can be differenced."""
    from bioperceiver.evaluation import Resampler, quiet_metric_warnings

    vals = []
    with quiet_metric_warnings():
        for idx in Resampler(len(groups), n_boot, seed, groups).indices():
            try:
                vals.append(score_fn(idx))
            except ValueError:
                vals.append(np.nan)
    return np.asarray(vals, dtype=float)


def interval(draws: np.ndarray) -> list[float]:
    """95% percentile interval of bootstrap draws."""
    return [float(np.nanquantile(draws, 0.025)), float(np.nanquantile(draws, 0.975))]


def paired_differences(points: dict, draws: dict) -> dict:
    """``pretrained/<x> - random_init/<x>`` for every input ``x`` both models have, on the same resamples."""
    out = {}
    for name in points:
        if name.startswith("pretrained/") and (other := "random_init/" + name.split("/", 1)[1]) in points:
            d = draws[name] - draws[other]
            out[f"{name} - {other}"] = {"difference": points[name] - points[other], "ci": interval(d)}
    return out


def _as_list(v) -> list[str]:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return []
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            return [v]
    return [str(x) for x in v]


def findings_probe(emb_by_model, train, test, label_col, text_col, top_k, n_boot, seed) -> dict:
    """Per finding (the ``top_k`` most frequent on train): test AUROC of logistic regression on each model's frozen
    embeddings vs TF-IDF + LR vs the best single TF-IDF feature (chosen by train AUROC)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ytr_lists = [_as_list(v) for v in train[label_col]]
    counts = pd.Series([f for fs in ytr_lists for f in set(fs)]).value_counts()
    classes = counts.index[:top_k].tolist()
    ytr = np.array([[c in fs for c in classes] for fs in ytr_lists], dtype=int)
    yte = np.array([[c in _as_list(v) for c in classes] for v in test[label_col]], dtype=int)
    groups = test["patient_id"].astype(str).to_numpy()

    probs = {}
    for name, (etr, ete) in emb_by_model.items():
        p = np.zeros(yte.shape)
        for k in range(len(classes)):
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
            p[:, k] = clf.fit(etr, ytr[:, k]).predict_proba(ete)[:, 1]
        probs[name] = p
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    xtr = vec.fit_transform(train[text_col].fillna(""))
    xte = vec.transform(test[text_col].fillna(""))
    vocab = np.array(vec.get_feature_names_out())
    p_tfidf, p_single, single = np.zeros(yte.shape), np.zeros(yte.shape), {}
    for k, c in enumerate(classes):
        p_tfidf[:, k] = LogisticRegression(C=10.0, max_iter=2000).fit(xtr, ytr[:, k]).predict_proba(xte)[:, 1]
        # the single TF-IDF feature whose value best ranks the train rows (either direction)
        present = np.asarray((xtr > 0).sum(0)).ravel() >= 5
        xs = xtr[:, present].toarray()
        aucs = np.array([roc_auc_score(ytr[:, k], xs[:, j]) for j in range(xs.shape[1])])
        j = int(np.argmax(np.abs(aucs - 0.5)))
        sign = 1.0 if aucs[j] >= 0.5 else -1.0
        col = np.flatnonzero(present)[j]
        p_single[:, k] = sign * xte[:, col].toarray().ravel()
        single[c] = {"feature": str(vocab[col]), "train_auroc": float(max(aucs[j], 1 - aucs[j]))}
    probs["tfidf_lr"], probs["best_single_tfidf_feature"] = p_tfidf, p_single
    # the same text squeezed to the embeddings' width (truncated SVD fitted on train): is the width the limit?
    dim = min(next(iter(emb_by_model.values()))[0].shape[1], xtr.shape[1] - 1)  # at most the text's features - 1
    svd = TruncatedSVD(n_components=dim, random_state=0).fit(xtr)
    ztr, zte = svd.transform(xtr), svd.transform(xte)
    p_svd = np.zeros(yte.shape)
    for k in range(len(classes)):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        p_svd[:, k] = clf.fit(ztr, ytr[:, k]).predict_proba(zte)[:, 1]
    probs[f"tfidf_svd{dim}_lr"] = p_svd

    def macro(p, idx):
        return float(np.mean([roc_auc_score(yte[idx, k], p[idx, k]) for k in range(len(classes))]))

    out = {"classes": classes, "train_rows": len(train), "test_rows": len(test), "models": {}}
    points, draws = {}, {}
    for name, p in probs.items():
        draws[name] = patient_bootstrap(lambda idx, p=p: macro(p, idx), groups, n_boot, seed)
        points[name] = macro(p, np.arange(len(yte)))
        per = {c: float(roc_auc_score(yte[:, k], p[:, k])) for k, c in enumerate(classes)}
        out["models"][name] = {"macro_auroc": points[name], "ci": interval(draws[name]), "per_finding": per}
    out["paired"] = paired_differences(points, draws)
    for c in classes:
        single[c]["test_auroc"] = out["models"]["best_single_tfidf_feature"]["per_finding"][c]
    out["single_feature"] = single
    return out


def _clinical_frame(cells: pd.Series) -> pd.DataFrame:
    rows = [json.loads(c) if isinstance(c, str) else {} for c in cells]
    df = pd.DataFrame(rows, index=cells.index)
    return df.dropna(axis=1, how="all")


def _cox_cindex(xtr, ttr, etr, xte, tte, ete, penalizer=0.1):
    from lifelines import CoxPHFitter
    from lifelines.utils import concordance_index

    cols = [f"x{i}" for i in range(xtr.shape[1])]
    df = pd.DataFrame(xtr, columns=cols).assign(T=ttr, E=etr)
    cph = CoxPHFitter(penalizer=penalizer).fit(df, "T", "E")
    risk = cph.predict_partial_hazard(pd.DataFrame(xte, columns=cols)).to_numpy()
    return risk, concordance_index


def survival_probe(emb_by_model, train, test, n_pcs, n_boot, seed) -> dict:
    """Per ``meta_source`` cohort: test C-index of a ridge Cox on the top ``n_pcs`` principal components of each
    model's frozen embedding (PCA fitted on the cohort's train rows) vs a ridge Cox on the clinical fields."""
    from lifelines.utils import concordance_index
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    out = {}
    for cohort in sorted(test["meta_source"].unique()):
        tr = (train["meta_source"] == cohort).to_numpy()
        te = (test["meta_source"] == cohort).to_numpy()
        ttr = train.loc[tr, "label_survival_time"].astype(float).to_numpy()
        etr = train.loc[tr, "label_survival_event"].astype(float).to_numpy()
        tte = test.loc[te, "label_survival_time"].astype(float).to_numpy()
        ete = test.loc[te, "label_survival_event"].astype(float).to_numpy()
        groups = test.loc[te, "patient_id"].astype(str).to_numpy()
        res = {"train_rows": int(tr.sum()), "test_rows": int(te.sum()), "test_events": int(ete.sum())}
        if ete.sum() < 2 or etr.sum() < 5:
            out[cohort] = {**res, "skipped": "fewer than 2 test or 5 train events"}
            continue
        feats = {}
        for name, (xtr_all, xte_all) in emb_by_model.items():
            sc = StandardScaler().fit(xtr_all[tr])
            pca = PCA(n_components=min(n_pcs, int(tr.sum()) - 1), random_state=0).fit(sc.transform(xtr_all[tr]))
            feats[name] = (pca.transform(sc.transform(xtr_all[tr])), pca.transform(sc.transform(xte_all[te])))
        clin_tr = _clinical_frame(train.loc[tr, "tabular_clinical"])
        if clin_tr.shape[1]:
            clin_te = _clinical_frame(test.loc[te, "tabular_clinical"]).reindex(columns=clin_tr.columns)
            both = pd.get_dummies(pd.concat([clin_tr, clin_te]), dummy_na=False, dtype=float)
            both = both.apply(pd.to_numeric, errors="coerce")
            both = both.fillna(both.iloc[: len(clin_tr)].median()).fillna(0.0)
            both = both.loc[:, both.iloc[: len(clin_tr)].std() > 0]
            sc = StandardScaler().fit(both.iloc[: len(clin_tr)])
            feats["clinical_cox"] = (sc.transform(both.iloc[: len(clin_tr)]), sc.transform(both.iloc[len(clin_tr) :]))
        points, draws = {}, {}
        for name, (xa, xb) in feats.items():
            try:
                risk, _ = _cox_cindex(xa, ttr, etr, xb, tte, ete)
            except Exception as e:  # lifelines convergence failures: record, do not stop the other cohorts
                res[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
                continue

            def cidx(idx, risk=risk, tte=tte, ete=ete):
                if ete[idx].sum() == 0:
                    raise ValueError("no events")
                return concordance_index(tte[idx], -risk[idx], ete[idx])

            draws[name] = patient_bootstrap(cidx, groups, n_boot, seed)
            points[name] = float(cidx(np.arange(len(tte))))
            res[name] = {"c_index": points[name], "ci": interval(draws[name])}
        res["paired"] = paired_differences(points, draws)
        out[cohort] = res
    return out


# ------------------------------------------------------------------------------------------ the pretraining signal
def pretraining_signal(run_dir: Path) -> dict:
    """Losses from ``history.json`` (the run folder above ``final/``) against ln(batch size)."""
    import yaml

    hist_path = run_dir / "history.json"
    cfg_path = run_dir / "final" / "run_config.yaml"
    if not hist_path.exists():
        return {"missing": str(hist_path)}
    hist = json.loads(hist_path.read_text())
    batch = None
    if cfg_path.exists():
        cfg = yaml.safe_load(cfg_path.read_text())
        batch = next((s["batch_size"] for s in cfg.values() if isinstance(s, dict) and "batch_size" in s), None)
    train = [(h["step"], h["loss"]) for h in hist if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h]
    tail = [v for _, v in train[-max(1, len(train) // 10) :]]
    out = {
        "batch_size": batch,
        "ln_batch": math.log(batch) if batch else None,
        "train_loss_first": train[0][1] if train else None,
        "train_loss_last10pct_mean": float(np.mean(tail)) if tail else None,
        "eval_loss": evals,
        "train": train,
    }
    if batch:
        out["eval_loss_fraction_of_ln_batch"] = [v / math.log(batch) for _, v in evals]
        out["train_loss_fraction_of_ln_batch_last10pct"] = out["train_loss_last10pct_mean"] / math.log(batch)
    return out


def text_statistics(processor, table: pd.DataFrame) -> dict:
    """Per text modality: tokens per row (special tokens included), [UNK] rate, truncation rate, vocabulary use."""
    out = {}
    for name, proc in processor.processors.items():
        tok = getattr(proc, "tokenizer", None)
        if tok is None or name not in table:
            continue
        texts = table[name].dropna().astype(str).tolist()
        encs = tok.encode_batch(texts)
        unk = tok.token_to_id("[UNK]")
        lengths = np.array([len(e.ids) for e in encs])
        truncated = np.array([len(e.overflowing) > 0 for e in encs])
        ids = np.concatenate([e.ids for e in encs]) if encs else np.array([], int)
        vocab = tok.get_vocab_size()
        out[name] = {
            "rows": len(texts),
            "max_length": int(proc.settings.max_length),
            "tokens_mean": float(lengths.mean()),
            "tokens_median": float(np.median(lengths)),
            "tokens_p95": float(np.quantile(lengths, 0.95)),
            "truncation_rate": float(truncated.mean()),
            "unk_rate": float(np.mean(ids == unk)) if unk is not None else None,
            "vocab_size": int(vocab),
            "vocab_used_fraction": float(len(np.unique(ids)) / vocab),
            "words_per_row_mean": float(np.mean([len(t.split()) for t in texts])),
        }
    return out


# ---------------------------------------------------------------------------------------------------------- plots
def plot(results: dict, path_prefix: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saved = []
    reps = results["representation"]
    keys = [k for k in reps["pretrained"] if not k.startswith("alignment/")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for model, style in (("pretrained", "-"), ("random_init", "--")):
            s = np.asarray(reps[model][k]["singular_values"])
            ax.semilogy(
                np.arange(1, len(s) + 1),
                s / s[0],
                style,
                label=f"{model} (erank {reps[model][k]['effective_rank']:.1f})",
            )
        ax.set_title(k)
        ax.set_xlabel("index")
        ax.set_ylabel("singular value / largest")
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = path_prefix.with_name(path_prefix.name + "_spectrum.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    saved.append(str(p))
    sig = results.get("pretraining_signal", {})
    if sig.get("train"):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        st, lv = zip(*sig["train"])
        ax.plot(st, lv, label=f"training loss (batch {sig['batch_size']})")
        if sig["eval_loss"]:
            es, ev = zip(*sig["eval_loss"])
            ax.plot(es, ev, "o", label="held-out loss (same batch size)")
        if sig.get("ln_batch"):
            ax.axhline(sig["ln_batch"], color="k", ls=":", label="ln(batch): uniform guess")
        ax.set_xlabel("step")
        ax.set_ylabel("contrastive loss (nats)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = path_prefix.with_name(path_prefix.name + "_loss.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        saved.append(str(p))
    return saved


# ------------------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_dir", required=True, help="a pretraining run's final/ folder")
    p.add_argument("--manifest", required=True, help="manifest with held-out rows (and train rows for the probes)")
    p.add_argument(
        "--split",
        default="test",
        help="held-out split(s), comma-separated (the manifest's `split` "
        "column, else the library's patient hash split)",
    )
    p.add_argument("--train_split", default="train")
    p.add_argument("--max_rows", type=int, default=3000, help="rows per side (train / held-out), seeded sample")
    p.add_argument("--top_k", type=int, default=6, help="findings probed (most frequent on train)")
    p.add_argument("--n_pcs", type=int, default=5, help="principal components of the embedding for the Cox probe")
    p.add_argument("--n_boot", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", required=True)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    from bioperceiver.data import read_manifest
    from bioperceiver.data.splits import split_of

    t0 = time.time()
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = read_manifest(args.manifest)
    table = m.table.copy()
    if "split" not in table:
        table["split"] = [split_of(str(p)) for p in table["patient_id"]]
    held = table[table["split"].isin(args.split.split(","))]
    train = table[table["split"] == args.train_split]
    held = held.sample(n=min(args.max_rows, len(held)), random_state=args.seed).sort_index()
    train = train.sample(n=min(args.max_rows, len(train)), random_state=args.seed).sort_index()
    pre, rand = load_models(args.pretrained_dir, args.seed)
    modalities = list(pre.modalities)
    logger.info("embedding %d train + %d held-out rows with 2 models", len(train), len(held))
    embs = {}
    for name, loaded in (("pretrained", pre), ("random_init", rand)):
        embs[name] = {
            part: embed(loaded, [{k: v for k, v in r.items()} for r in df.to_dict("records")], m.base_dir)
            for part, df in (("train", train), ("held", held))
        }
    # embedding_rows may skip rows: keep the rows every model embedded, in table order
    keep_tr = set(embs["pretrained"]["train"]["ids"])
    keep_te = set(embs["pretrained"]["held"]["ids"])
    train = train[train["sample_id"].isin(keep_tr)]
    held = held[held["sample_id"].isin(keep_te)]

    def aligned(e, df):
        pos = {s: i for i, s in enumerate(e["ids"])}
        idx = [pos[s] for s in df["sample_id"]]
        return {k: v[idx] for k, v in e.items() if k != "ids"}

    for name in embs:
        embs[name] = {"train": aligned(embs[name]["train"], train), "held": aligned(embs[name]["held"], held)}
    results = {
        "pretrained_dir": str(args.pretrained_dir),
        "manifest": str(args.manifest),
        "split": args.split,
        "seed": args.seed,
        "modalities": pre.modalities,
        "representation": {n: representation(e["held"], modalities) for n, e in embs.items()},
    }
    label_cols = [c for c in table.columns if c.startswith("label_")]
    text_cols = [n for n, p in pre.processor.processors.items() if getattr(p, "tokenizer", None) is not None]
    probe_inputs = {}
    for n, e in embs.items():
        probe_inputs[f"{n}/fused"] = (e["train"]["fused"], e["held"]["fused"])
        for mod in modalities:
            if not np.isnan(e["train"][mod]).any() and not np.isnan(e["held"][mod]).any():
                probe_inputs[f"{n}/{mod}"] = (e["train"][mod], e["held"][mod])
    if "label_survival_time" in label_cols:
        results["survival_probe"] = survival_probe(probe_inputs, train, held, args.n_pcs, args.n_boot, args.seed)
    multi = [c for c in label_cols if c not in ("label_survival_time", "label_survival_event")]
    if multi and text_cols:
        results["findings_probe"] = findings_probe(
            probe_inputs, train, held, multi[0], text_cols[0], args.top_k, args.n_boot, args.seed
        )
    results["pretraining_signal"] = pretraining_signal(Path(args.pretrained_dir).parent)
    results["text_statistics"] = text_statistics(pre.processor, held)
    results["plots"] = plot(results, out_dir / "diagnostics")
    results["wall_s"] = time.time() - t0
    (out_dir / "diagnostics.json").write_text(json.dumps(results, indent=1, default=float))
    logger.info("wrote %s (%.0f s)", out_dir / "diagnostics.json", results["wall_s"])
    return results


if __name__ == "__main__":
    main()
