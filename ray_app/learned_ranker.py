"""A ranker learned from human ratings (the paper's open question, 2.5): a logistic regression
from an image's metrics to the chance that raters pass it, fitted on the ratings that
`restage review results` collects, cross-validated by product against the fixed ranking it
would replace, saved as JSON and scored as ``generate.ranking='learned'``.

Model: each feature (a ``Metric``) imputed with its training mean where NaN, standardised,
then an L2 logistic regression whose C is chosen by an inner product-grouped CV (log loss).
Cross-validation: product-grouped folds (a product's images share its adapter, so an image of
a product in training would leak into the test), the learned model's out-of-fold probability
and the fixed ranking's score compared on the same held-out images: ROC AUC, Pearson and
Spearman with the human pass, and each gain (learned - fixed) with a percentile bootstrap
over products. The headline is Pearson's, the paper's measure (0.4 for the plain sum).

The model file is JSON, not a pickle: serve replicas load it, and reading it must not run
code. Scoring needs numpy only; scikit-learn and scipy are imported by ``fit``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ray_app import storage
from ray_app.kinds import Metric
from ray_app.ranking import Ranking, build, register

if TYPE_CHECKING:
    from ray_app.config import GenerateConfig, RestageConfig, ScoringConfig

FORMAT = "restage-learned-ranker"
FORMAT_VERSION = 1
RATINGS_FILE = "images.parquet"  # in the folder `restage review results` writes
KEY_COLUMNS = ("run", "product_id", "image_id")
LABEL_COLUMN = "human_pass"
# The inner CV's grid of C (inverse L2 strength) on standardised features: from a strong pull
# towards the base rate to almost none.
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
INNER_FOLDS = 5
STATISTICS = ("auc", "pearson", "spearman")
HEADLINE = "pearson"  # the paper's measure (2.5: "0.4 Pearson correlation")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Metrics added after ratings tables existed: a table without the column reads as NaN, and
# the ratings digest counts the metric only where it has a value, so an older table (or one
# without the metric) keeps the digest that `generate.ranker_sha256` pins.
OPTIONAL_METRICS = (Metric.PERSONAL_FIDELITY,)


class RankerError(ValueError):
    """Bad ratings, a bad fit request or a bad model file; the message names which."""


# --------------------------------------------------------------------------- ratings


@dataclass(frozen=True)
class Ratings:
    """The fully rated images of a ratings table (``human_pass`` not null), in file order."""

    uri: str
    keys: list[tuple[str, str, str]]  # (run, product_id, image_id)
    labels: np.ndarray  # bool, the human pass
    metrics: dict[Metric, np.ndarray]  # float64 per Metric, NaN where not computed
    n_unrated: int  # rows left out: not fully rated (human_pass null)

    @property
    def products(self) -> np.ndarray:
        return np.array([k[1] for k in self.keys], dtype=object)

    def __len__(self) -> int:
        return len(self.keys)


def ratings_uri(uri: str) -> str:
    """``uri`` itself, or the ratings file in it when it is a folder."""
    fs, path = storage.url_to_fs(uri)
    return storage.join(uri, RATINGS_FILE) if fs.isdir(path) else uri


def read_ratings(uri: str) -> Ratings:
    """Read a ratings table (ray_app.records.RATED_IMAGE_SCHEMA): a Parquet file, or the
    folder of `restage review results` holding ``images.parquet``."""
    path = ratings_uri(uri)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"--ratings {uri}: no such file ({path}); give the images.parquet of "
            "`restage review results`, or its folder"
        )
    table = storage.read_parquet(path)
    optional = {m.value for m in OPTIONAL_METRICS}
    needed = [*KEY_COLUMNS, LABEL_COLUMN, *(m.value for m in Metric if m not in optional)]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise RankerError(
            f"ratings {path}: columns {missing} are missing; a ratings table has the columns "
            f"of ray_app.records.RATED_IMAGE_SCHEMA (got {table.column_names})"
        )
    label = table.column(LABEL_COLUMN).to_pylist()
    rated = [i for i, v in enumerate(label) if v is not None]
    keys = list(zip(*(table.column(c).to_pylist() for c in KEY_COLUMNS), strict=True))
    keys = [keys[i] for i in rated]
    twice = [k for k, n in Counter(keys).items() if n > 1]
    if twice:
        raise RankerError(
            f"ratings {path}: {len(twice)} image(s) with more than one row, e.g. {twice[0]} "
            "(run, product_id, image_id): give one row per image"
        )

    def values(m: Metric) -> np.ndarray:
        if m.value not in table.column_names:  # an optional metric (OPTIONAL_METRICS)
            return np.full(len(rated), np.nan)
        column = table.column(m.value).to_pylist()
        return np.array([np.nan if v is None else v for v in column], np.float64)[rated]

    metrics = {m: values(m) for m in Metric}
    return Ratings(
        uri=path,
        keys=keys,
        labels=np.array([bool(label[i]) for i in rated], bool),
        metrics=metrics,
        n_unrated=table.num_rows - len(rated),
    )


def ratings_digest(ratings: Ratings) -> str:
    """sha256 of the rated rows, canonical: sorted by (run, product_id, image_id), then each
    row's key, label and every Metric column (float32, one NaN), so that the same ratings give
    the same digest whatever the file's row order or the features a fit chose."""
    order = sorted(range(len(ratings)), key=lambda i: ratings.keys[i])
    counted = [
        m for m in Metric if m not in OPTIONAL_METRICS or not np.isnan(ratings.metrics[m]).all()
    ]
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "metrics": [m.value for m in counted]}).encode())
    h.update(json.dumps([list(ratings.keys[i]) for i in order]).encode())
    h.update(ratings.labels[order].astype(np.uint8).tobytes())
    for m in counted:
        x = ratings.metrics[m][order].astype("<f4") + np.float32(0)  # -0.0 -> 0.0
        x[np.isnan(x)] = np.float32("nan")  # one bit pattern for NaN
        h.update(x.tobytes())
    return h.hexdigest()


def choose_features(ratings: Ratings, features: Sequence[str] | None) -> list[Metric]:
    """``features`` validated against the Metric names, or every Metric with a value."""
    if features is None:
        chosen = [m for m in Metric if np.isfinite(ratings.metrics[m]).any()]
        if not chosen:
            raise RankerError(f"ratings {ratings.uri}: every metric is NaN in every rated image")
        return chosen
    valid = [m.value for m in Metric]
    unknown = [f for f in features if f not in valid]
    if unknown or not features:
        raise RankerError(
            f"--features {list(features)}: unknown {unknown or 'empty list'}; "
            f"the features are: {', '.join(valid)}"
        )
    if len(set(features)) != len(features):
        raise RankerError(f"--features {list(features)}: a feature is named twice")
    empty = [f for f in features if not np.isfinite(ratings.metrics[Metric(f)]).any()]
    if empty:
        raise RankerError(
            f"--features: {empty} are NaN in every rated image of {ratings.uri}; leave them out"
        )
    return [Metric(f) for f in features]


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class LearnedModel:
    """A fitted ranker, as its JSON file holds it: p(pass) = sigmoid(((x imputed - mean) /
    scale) . coef + intercept), x the features in order."""

    features: tuple[Metric, ...]
    impute_means: tuple[float, ...]  # training means, for NaN features
    scaler_mean: tuple[float, ...]
    scaler_scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    ratings_sha256: str
    n_images: int
    n_products: int
    n_passes: int
    sklearn_version: str
    report: dict[str, Any] = field(default_factory=dict)  # CrossValidation.to_dict()
    fit_config: dict[str, Any] = field(default_factory=dict)

    def predict(self, metrics: Mapping[str, np.ndarray]) -> np.ndarray:
        """Pass probabilities (float64), one per item; NaN features imputed as in training."""
        missing = [f.value for f in self.features if f not in metrics]
        if missing:
            raise RankerError(
                f"learned ranking: metrics {missing} are missing (its features are "
                f"{[f.value for f in self.features]}); got {sorted(map(str, metrics))}"
            )
        x = np.stack([np.asarray(metrics[f], np.float64) for f in self.features], axis=1)
        x = np.where(np.isnan(x), np.asarray(self.impute_means), x)
        z = (x - np.asarray(self.scaler_mean)) / np.asarray(self.scaler_scale)
        logit = z @ np.asarray(self.coef) + self.intercept
        return 1.0 / (1.0 + np.exp(-logit))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = [f.value for f in self.features]
        for k in ("impute_means", "scaler_mean", "scaler_scale", "coef"):
            d[k] = list(d[k])
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **d}

    def save(self, uri: str) -> str:
        return storage.write_json(uri, self.to_dict())

    @classmethod
    def from_dict(cls, d: Any, uri: str) -> LearnedModel:
        """Validate a parsed model file; every error names ``uri`` and the field."""

        def bad(key: str, why: str) -> RankerError:
            return RankerError(f"ranker file {uri}: {key}: {why}")

        if not isinstance(d, dict):
            raise bad("(top level)", "expected a JSON object")
        if d.get("format") != FORMAT:
            raise bad("format", f"{d.get('format')!r} is not {FORMAT!r}: not a ranker file")
        if d.get("format_version") != FORMAT_VERSION:
            raise bad(
                "format_version",
                f"{d.get('format_version')!r}, this restage reads version {FORMAT_VERSION}: "
                "refit it with `restage ranker fit`",
            )
        known = {f.name for f in cls.__dataclass_fields__.values()} | {"format", "format_version"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise bad(str(unknown), f"unknown fields; a ranker file has {sorted(known)}")
        for key in known - {"report", "fit_config"}:
            if key not in d:
                raise bad(key, "missing")
        features = d["features"]
        if not isinstance(features, list) or not features:
            raise bad("features", f"{features!r}: expected a non-empty list of metric names")
        valid = [m.value for m in Metric]
        for name in features:
            if name not in valid:
                raise bad("features", f"unknown feature {name!r}; the features are {valid}")
        if len(set(features)) != len(features):
            raise bad("features", f"{features}: a feature is named twice")
        n = len(features)
        vectors = {}
        for key in ("impute_means", "scaler_mean", "scaler_scale", "coef"):
            v = d[key]
            if not isinstance(v, list) or len(v) != n or not all(_is_finite(x) for x in v):
                raise bad(key, f"{v!r}: expected {n} finite numbers, one per feature")
            vectors[key] = tuple(float(x) for x in v)
        if not all(s > 0 for s in vectors["scaler_scale"]):
            raise bad("scaler_scale", f"{vectors['scaler_scale']}: every scale must be above 0")
        if not _is_finite(d["intercept"]):
            raise bad("intercept", f"{d['intercept']!r}: expected a finite number")
        if not isinstance(d["ratings_sha256"], str) or not _SHA256.fullmatch(d["ratings_sha256"]):
            raise bad("ratings_sha256", f"{d['ratings_sha256']!r}: expected 64 hex digits")
        for key in ("n_images", "n_products", "n_passes"):
            if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] < 0:
                raise bad(key, f"{d[key]!r}: expected a count")
        if not isinstance(d["sklearn_version"], str):
            raise bad("sklearn_version", f"{d['sklearn_version']!r}: expected a string")
        for key in ("report", "fit_config"):
            if not isinstance(d.get(key, {}), dict):
                raise bad(key, f"{d[key]!r}: expected an object")
        return cls(
            features=tuple(Metric(f) for f in features),
            **vectors,
            intercept=float(d["intercept"]),
            ratings_sha256=d["ratings_sha256"],
            n_images=d["n_images"],
            n_products=d["n_products"],
            n_passes=d["n_passes"],
            sklearn_version=d["sklearn_version"],
            report=d.get("report", {}),
            fit_config=d.get("fit_config", {}),
        )

    @classmethod
    def load(cls, uri: str, ratings_sha256: str | None = None) -> LearnedModel:
        """Read and validate a model file; with ``ratings_sha256``, refuse one fitted on other
        ratings (``generate.ranker_sha256``)."""
        if not storage.exists(uri):
            raise FileNotFoundError(f"ranker file {uri}: no such file (`restage ranker fit` --out)")
        try:
            parsed = json.loads(storage.read_bytes(uri))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RankerError(f"ranker file {uri}: not JSON ({exc})") from None
        model = cls.from_dict(parsed, uri)
        if ratings_sha256 is not None and model.ratings_sha256 != ratings_sha256:
            raise RankerError(
                f"ranker file {uri}: training data digest mismatch: its ratings_sha256 is "
                f"{model.ratings_sha256}, generate.ranker_sha256 pins {ratings_sha256}; point "
                "generate.ranker at the model fitted on the pinned ratings, or update the pin"
            )
        return model


def _is_finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@register
class LearnedRanking(Ranking):
    """``generate.ranking='learned'``: the pass probability of a model fitted by `restage
    ranker fit` (``generate.ranker``)."""

    name = "learned"
    bounds = (0.0, 1.0)  # a probability
    # Keep an image only when raters are predicted to pass it more often than not: the
    # cut-off of a calibrated probability that errs least when a wrongly kept and a wrongly
    # dropped image cost alike. Lower it to keep more (the paper's pass rate is ~17%/image).
    default_threshold = 0.5

    def __init__(self, model: LearnedModel, uri: str | None = None):
        self.model, self.uri = model, uri

    @classmethod
    def from_config(cls, generate: GenerateConfig, scoring: ScoringConfig) -> LearnedRanking:
        if generate.ranker is None:  # the config refuses this; a hand-built one may not
            raise RankerError("generate.ranking='learned' needs generate.ranker (a model file)")
        return cls(LearnedModel.load(generate.ranker, generate.ranker_sha256), generate.ranker)

    def score(self, metrics: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.model.predict(metrics).astype(np.float32)


# --------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class FitOptions:
    """`restage ranker fit`'s options."""

    folds: int = 5
    features: tuple[str, ...] | None = None  # None: every Metric with a value
    seed: int = 0
    bootstrap: int = 1000  # resamples of products for the gains' intervals
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise RankerError(f"--folds {self.folds}: give at least 2 (e.g. 5)")
        if self.bootstrap < 1:
            raise RankerError(f"bootstrap={self.bootstrap}: give at least 1 resample, e.g. 1000")
        if not 0 < self.confidence < 1:
            raise RankerError(f"confidence={self.confidence}: give a fraction in (0, 1)")


@dataclass(frozen=True)
class Comparison:
    """One statistic of the out-of-fold predictions against the human pass, learned vs fixed,
    and the gain (learned - fixed) with its bootstrap interval over products."""

    learned: float
    fixed: float
    gain: float
    lo: float
    hi: float


@dataclass(frozen=True)
class CrossValidation:
    folds: int
    baseline: str  # the fixed ranking's name
    n_images: int  # held-out images compared (the fixed score finite)
    n_products: int
    statistics: dict[str, Comparison]  # STATISTICS
    headline: str
    gain: bool  # the headline gain's interval lies above 0
    confidence: float
    bootstrap: int
    skipped_resamples: int  # resamples with one class only (no AUC or correlation)
    fold_auc: list[dict[str, float | None]]  # per fold: learned, fixed (None: one class)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: an undefined statistic (NaN) is null, so that the file stays JSON."""

        def clean(x: Any) -> Any:
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return None if isinstance(x, float) and math.isnan(x) else x

        return clean(asdict(self))


@dataclass(frozen=True)
class FitResult:
    model: LearnedModel
    cv: CrossValidation
    splits: list[tuple[np.ndarray, np.ndarray]]  # (train, test) rows of each fold
    oof: np.ndarray  # out-of-fold pass probability per rated image
    fixed: np.ndarray  # the fixed ranking's score per rated image
    estimator: Any  # the final scikit-learn pipeline (predict_proba), for comparison

    def render(self) -> str:
        cv, m = self.cv, self.model
        conf = f"{cv.confidence:.0%}"
        lines = [
            f"learned ranker: {len(m.features)} features ({', '.join(m.features)}), "
            f"{m.n_images} images of {m.n_products} products, {m.n_passes} passes",
            f"{cv.folds}-fold cross-validation by product, {cv.n_images} held-out images, "
            f"learned vs {cv.baseline!r}:",
        ]
        for name, c in cv.statistics.items():
            lines.append(
                f"  {name:<9} learned {c.learned:+.3f}  fixed {c.fixed:+.3f}  "
                f"gain {c.gain:+.3f} [{conf} CI {c.lo:+.3f}, {c.hi:+.3f}]"
            )
        verdict = "above 0" if cv.gain else "includes 0 or below"
        lines.append(f"gain: {str(cv.gain).lower()} ({cv.headline} gain's CI {verdict})")
        lines.append(f"ratings_sha256: {m.ratings_sha256}")
        return "\n".join(lines)


def product_splits(
    products: np.ndarray, labels: np.ndarray, folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) rows of ``folds`` folds by product (no product on both sides), with the
    pass rate balanced across folds where the products allow."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_products = len(set(products))
    if n_products < folds:
        raise RankerError(
            f"--folds {folds}: the ratings have {n_products} products; product-grouped "
            f"cross-validation needs at least one product per fold: lower --folds or rate more"
        )
    if len(set(labels.tolist())) < 2:
        raise RankerError(
            f"every rated image has human_pass={bool(labels[0])}: a ranker needs passes and "
            "fails to learn from"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class" when passes are few
        warnings.simplefilter("ignore", UserWarning)
        return list(splitter.split(np.zeros(len(labels)), labels, products))


def _pipeline(c: float):
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        SimpleImputer(strategy="mean", keep_empty_features=True),
        StandardScaler(),
        LogisticRegression(C=c, max_iter=1000),
    )


def _choose_c(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int) -> float:
    """C of the lowest inner-CV log loss (product-grouped folds within ``x``); 1.0 (sklearn's
    default) when the training products are too few to split."""
    from sklearn.metrics import log_loss

    inner = min(INNER_FOLDS, len(set(groups)))
    if inner < 2:
        return 1.0
    try:
        splits = product_splits(groups, y, inner, seed)
    except RankerError:
        return 1.0
    losses = {c: [] for c in C_GRID}
    for train, test in splits:
        if len(set(y[train].tolist())) < 2:
            continue
        for c in C_GRID:
            p = _pipeline(c).fit(x[train], y[train]).predict_proba(x[test])[:, 1]
            losses[c].append(log_loss(y[test], p, labels=[0, 1]) * len(test))
    if not losses[C_GRID[0]]:
        return 1.0
    return min(C_GRID, key=lambda c: (sum(losses[c]), -c))  # ties: the weaker penalty


def _statistics(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
    """ROC AUC, Pearson and Spearman of scores ``s`` with the 0/1 labels ``y`` (NaN where
    undefined: one class, or a constant score). The same values as sklearn's roc_auc_score
    and scipy's pearsonr and spearmanr (tests check it), at a fraction of their call cost:
    the bootstrap calls this thousands of times."""
    from scipy.stats import rankdata

    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return dict.fromkeys(STATISTICS, math.nan)
    ranks = rankdata(s)  # ties share their mean rank: AUC counts a tie as half
    auc = (ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    return {
        "auc": float(auc),
        "pearson": _pearson(y, s),
        "spearman": _pearson(rankdata(y), ranks),  # Spearman: Pearson of the ranks
    }


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64) - np.mean(a)
    b = np.asarray(b, np.float64) - np.mean(b)
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else math.nan


def _bootstrap_gains(
    y: np.ndarray,
    learned: np.ndarray,
    fixed: np.ndarray,
    products: np.ndarray,
    options: FitOptions,
) -> tuple[dict[str, tuple[float, float]], int]:
    """Percentile intervals of each statistic's gain, resampling products (a product's images
    are not independent draws). ray_app.stats bootstraps means of per-product values; AUC and
    correlations are not means over products, so the whole statistic is recomputed on each
    resample here."""
    rows = [np.flatnonzero(products == p) for p in sorted(set(products))]
    rng = np.random.default_rng(options.seed)
    gains = {k: [] for k in STATISTICS}
    skipped = 0
    for _ in range(options.bootstrap):
        idx = np.concatenate([rows[i] for i in rng.integers(0, len(rows), len(rows))])
        a, b = _statistics(y[idx], learned[idx]), _statistics(y[idx], fixed[idx])
        if any(math.isnan(v) for v in (*a.values(), *b.values())):
            skipped += 1
            continue
        for k in STATISTICS:
            gains[k].append(a[k] - b[k])
    tail = (1 - options.confidence) / 2 * 100
    out = {}
    for k, g in gains.items():
        lo, hi = np.percentile(g, [tail, 100 - tail]) if g else (math.nan, math.nan)
        out[k] = (float(lo), float(hi))
    return out, skipped


def fit(ratings: Ratings, config: RestageConfig, options: FitOptions | None = None) -> FitResult:
    """Fit the learned ranker on ``ratings`` and cross-validate it by product against the
    fixed ranking ``config.generate`` configures (the paper's sum by default)."""
    import sklearn

    options = options or FitOptions()
    if config.generate.ranking == LearnedRanking.name:
        raise RankerError(
            "the baseline is generate.ranking, which is 'learned' here: compare against a "
            "fixed ranking, e.g. --set generate.ranker=null --set generate.ranking=paper"
        )
    baseline = build(config.generate, config.scoring)
    features = choose_features(ratings, options.features)
    x = np.stack([ratings.metrics[f] for f in features], axis=1)
    y = ratings.labels.astype(np.int64)
    products = ratings.products
    splits = product_splits(products, ratings.labels, options.folds, options.seed)

    oof = np.full(len(y), np.nan)
    chosen_c = []
    for k, (train, test) in enumerate(splits):
        if len(set(y[train].tolist())) < 2:
            raise RankerError(
                f"fold {k}: its training products have only human_pass={bool(y[train][0])}; "
                "lower --folds or rate more products with both outcomes"
            )
        c = _choose_c(x[train], y[train], products[train], options.seed)
        chosen_c.append(c)
        oof[test] = _pipeline(c).fit(x[train], y[train]).predict_proba(x[test])[:, 1]
    fixed = np.asarray(baseline.score(ratings.metrics), np.float64)

    # Compared where the fixed ranking scores (the paper's sum is NaN with a metric missing).
    both = np.isfinite(fixed)
    if len(set(y[both].tolist())) < 2:
        raise RankerError(
            f"the {baseline.name} ranking scores {int(both.sum())} of {len(y)} rated images, "
            "too few with both outcomes to compare against"
        )
    point = {
        k: Comparison(
            learned=a,
            fixed=b,
            gain=a - b,
            lo=math.nan,
            hi=math.nan,
        )
        for (k, a), b in zip(
            _statistics(y[both], oof[both]).items(),
            _statistics(y[both], fixed[both]).values(),
            strict=True,
        )
    }
    intervals, skipped = _bootstrap_gains(y[both], oof[both], fixed[both], products[both], options)
    statistics = {
        k: Comparison(c.learned, c.fixed, c.gain, *intervals[k]) for k, c in point.items()
    }
    fold_auc = []
    for _, test in splits:
        t = test[both[test]]
        fold_auc.append(
            {
                "learned": _none_if_nan(_statistics(y[t], oof[t])["auc"]),
                "fixed": _none_if_nan(_statistics(y[t], fixed[t])["auc"]),
            }
        )
    head = statistics[HEADLINE]
    cv = CrossValidation(
        folds=options.folds,
        baseline=baseline.name,
        n_images=int(both.sum()),
        n_products=len(set(products[both])),
        statistics=statistics,
        headline=HEADLINE,
        gain=bool(head.lo > 0),  # NaN (no usable resample) compares False
        confidence=options.confidence,
        bootstrap=options.bootstrap,
        skipped_resamples=skipped,
        fold_auc=fold_auc,
    )

    c = _choose_c(x, y, products, options.seed)
    estimator = _pipeline(c).fit(x, y)
    imputer, scaler, logistic = (step for _, step in estimator.steps)
    model = LearnedModel(
        features=tuple(features),
        impute_means=tuple(float(v) for v in imputer.statistics_),
        scaler_mean=tuple(float(v) for v in scaler.mean_),
        scaler_scale=tuple(float(v) for v in scaler.scale_),
        coef=tuple(float(v) for v in logistic.coef_[0]),
        intercept=float(logistic.intercept_[0]),
        ratings_sha256=ratings_digest(ratings),
        n_images=len(y),
        n_products=len(set(products)),
        n_passes=int(y.sum()),
        sklearn_version=sklearn.__version__,
        report=cv.to_dict(),
        fit_config={
            "ratings": ratings.uri,
            "n_unrated": ratings.n_unrated,
            "folds": options.folds,
            "seed": options.seed,
            "features": None if options.features is None else list(options.features),
            "c_grid": list(C_GRID),
            "c": c,
            "c_per_fold": chosen_c,
            "inner_folds": INNER_FOLDS,
            "impute": "training mean",
            "baseline": baseline.name,
            "bootstrap": options.bootstrap,
            "confidence": options.confidence,
        },
    )
    return FitResult(model, cv, splits, oof, fixed, estimator)


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x
