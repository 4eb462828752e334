"""The results of a human rating round (paper 3.1 and A.3): each image's verdict, the pass
rates per image and per product with confidence intervals, the raters' agreement (Fleiss'
kappa), and how well each automatic metric predicts the human verdict.

Pure computation on Arrow tables (no Ray, no database) plus one writer; the review app's
results page and `restage review results` call it. The inputs are the raters' answers
(``ANSWER_SCHEMA``) and the images put to them (``RATED_IMAGE_SCHEMA`` without the verdict
columns, which are computed here).

A rater has rated an image when they answered all 8 questions (``Question``); a partial set
of answers counts as not rated. An image gets a verdict once ``raters_per_image`` raters
have rated it; until then it is pending and left out of every rate.

Resampling unit: the product. A product's images share its adapter and its photos, so they
pass or fail together more often than independent draws would; intervals that resampled
images would be too narrow. Every bootstrap here resamples products (clusters) and keeps
all of a resampled product's images.
"""

from __future__ import annotations

import io
import zlib
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from statistics import NormalDist
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from ray_app import storage
from ray_app.config import ReviewConfig
from ray_app.kinds import Answer, Metric, Question
from ray_app.records import ANSWER_SCHEMA, RATED_IMAGE_SCHEMA

# What verdicts() computes; an images table may have these absent or null.
VERDICT_COLUMNS = ("n_raters", "rater_passes", "human_pass")
# An image is named by these three in both tables.
IMAGE_KEY = ("run", "product_id", "image_id")
# What is correlated with the human verdict: each metric and the ranking's aggregate score.
PREDICTORS: tuple[str, ...] = (*(str(m) for m in Metric), "score")
# The files write_results() writes under its folder.
ANSWERS_PARQUET = "answers.parquet"
ANSWERS_CSV = "answers.csv"
IMAGES_PARQUET = "images.parquet"
SUMMARY_JSON = "summary.json"

ImageKey = tuple[str, str, str]
_OVERALL = "overall"
# Bootstrap weights are drawn in chunks of at most this many cells (resamples x images).
_CHUNK_CELLS = 2**21


# --------------------------------------------------------------------------- typed results


@dataclass(frozen=True)
class PassRate:
    """``passed`` of ``total`` and its interval [lo, hi] at the summary's confidence
    (all None when total = 0); ``interval`` says how the interval was computed."""

    passed: int
    total: int
    rate: float | None
    lo: float | None
    hi: float | None
    interval: str


@dataclass(frozen=True)
class Agreement:
    """Fleiss' kappa over ``images`` images rated by ``raters`` raters each: ``observed`` is
    the mean agreement of an image's pairs of raters (P-bar), ``expected`` the agreement that
    chance would give with the categories' overall shares (P-e). kappa is None when it is
    undefined: no image, fewer than 2 raters, or every answer in one category (P-e = 1)."""

    kappa: float | None
    observed: float | None
    expected: float | None
    images: int
    raters: int


@dataclass(frozen=True)
class Correlation:
    """A correlation coefficient over ``n`` images (of ``products`` products) and its
    product-bootstrap interval; r is None when undefined (n < 3 or a constant input)."""

    r: float | None
    lo: float | None
    hi: float | None
    n: int
    products: int


@dataclass(frozen=True)
class PredictorCorrelation:
    """How one metric (or the ranking score) goes with the human pass (0/1)."""

    pearson: Correlation  # point-biserial: the metric's mean gap between passes and fails
    spearman: Correlation  # rank-based: does a higher metric mean more passes?


@dataclass(frozen=True)
class GroupResults:
    """The results of one run, or of every run pooled (``ReviewSummary.overall``)."""

    images: int
    images_rated: int
    images_pending: int
    products: int  # overall: (run, product) pairs, a product once per run
    products_rated: int  # with at least one rated image
    per_image: PassRate  # passing images / rated images
    per_product: PassRate  # products with >= 1 passing image / products rated
    agreement: dict[str, Agreement]  # per Question, over its 4 answers
    pass_agreement: Agreement  # on each rater's own verdict (all 8 'yes' or not)
    # Per predictor (Metric values and "score"); None in `overall`: the runs' scores come
    # from their own rankings, and pooling runs mixes their pass rates into the correlation.
    correlations: dict[str, PredictorCorrelation] | None


@dataclass(frozen=True)
class ReviewSummary:
    """summary.json: the settings the statistics were computed with, each run's results and
    the results of every run pooled."""

    pass_rule: str
    raters_per_image: int
    confidence: float
    bootstrap_samples: int
    seed: int
    runs: dict[str, GroupResults]
    overall: GroupResults

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (no NaN: what is undefined is None)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReviewSummary:
        return cls(
            pass_rule=data["pass_rule"],
            raters_per_image=data["raters_per_image"],
            confidence=data["confidence"],
            bootstrap_samples=data["bootstrap_samples"],
            seed=data["seed"],
            runs={run: _group_from_dict(g) for run, g in data["runs"].items()},
            overall=_group_from_dict(data["overall"]),
        )


def _group_from_dict(d: Mapping[str, Any]) -> GroupResults:
    corr = d["correlations"]
    return GroupResults(
        images=d["images"],
        images_rated=d["images_rated"],
        images_pending=d["images_pending"],
        products=d["products"],
        products_rated=d["products_rated"],
        per_image=PassRate(**d["per_image"]),
        per_product=PassRate(**d["per_product"]),
        agreement={q: Agreement(**a) for q, a in d["agreement"].items()},
        pass_agreement=Agreement(**d["pass_agreement"]),
        correlations=None
        if corr is None
        else {
            p: PredictorCorrelation(Correlation(**c["pearson"]), Correlation(**c["spearman"]))
            for p, c in corr.items()
        },
    )


@dataclass(frozen=True)
class ResultFiles:
    """The URIs write_results() wrote."""

    answers_parquet: str
    answers_csv: str
    images_parquet: str
    summary_json: str


# --------------------------------------------------------------------------- input checks


def _check_answers(answers: pa.Table) -> pa.Table:
    """``answers`` with exactly ANSWER_SCHEMA (columns selected and cast), nulls refused."""
    if not isinstance(answers, pa.Table):
        raise ValueError(f"answers: give a pyarrow.Table with ANSWER_SCHEMA, not {type(answers)}")
    missing = [n for n in ANSWER_SCHEMA.names if n not in answers.column_names]
    if missing:
        raise ValueError(
            f"answers lacks the columns {missing}: give ANSWER_SCHEMA's columns "
            f"{ANSWER_SCHEMA.names} (ray_app.records)"
        )
    try:
        table = answers.select(ANSWER_SCHEMA.names).cast(ANSWER_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(
            f"answers does not cast to ANSWER_SCHEMA ({exc}); its schema is {answers.schema}"
        ) from None
    for name in ANSWER_SCHEMA.names:
        if table[name].null_count:
            row = table[name].is_null().to_pylist().index(True)
            raise ValueError(f"answers row {row}: {name} is null; every answer column is required")
    return table


def _check_images(images: pa.Table) -> pa.Table:
    """``images`` as RATED_IMAGE_SCHEMA with null verdict columns; other columns dropped."""
    if not isinstance(images, pa.Table):
        raise ValueError(f"images: give a pyarrow.Table (RATED_IMAGE_SCHEMA), not {type(images)}")
    required = [n for n in RATED_IMAGE_SCHEMA.names if n not in VERDICT_COLUMNS]
    missing = [n for n in required if n not in images.column_names]
    if missing:
        raise ValueError(
            f"images lacks the columns {missing}: give RATED_IMAGE_SCHEMA's columns {required} "
            f"(null where unknown; {list(VERDICT_COLUMNS)} may be absent)"
        )
    columns = []
    for f in RATED_IMAGE_SCHEMA:
        if f.name in VERDICT_COLUMNS:
            columns.append(pa.nulls(images.num_rows, f.type))
            continue
        try:
            columns.append(images[f.name].cast(f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(
                f"images column {f.name} ({images.schema.field(f.name).type}) does not cast "
                f"to {f.type}: {exc}"
            ) from None
    for name in IMAGE_KEY:
        if images[name].null_count:
            row = images[name].is_null().to_pylist().index(True)
            raise ValueError(f"images row {row}: {name} is null; every image needs {IMAGE_KEY}")
    # The verdict columns are non-nullable in the schema; they are filled before the table
    # leaves this module, so the placeholder table is built without the schema's check.
    table = pa.Table.from_arrays(columns, names=RATED_IMAGE_SCHEMA.names)
    seen: set[ImageKey] = set()
    for row, key in enumerate(zip(*(table[n].to_pylist() for n in IMAGE_KEY), strict=True)):
        if key in seen:
            raise ValueError(
                f"images row {row}: (run, product_id, image_id) = {key} appears twice; "
                "give each image once"
            )
        seen.add(key)
    return table


def _image_keys(images: pa.Table) -> list[ImageKey]:
    return list(zip(*(images[n].to_pylist() for n in IMAGE_KEY), strict=True))


# --------------------------------------------------------------------------- rater sheets


@dataclass(frozen=True)
class _Sheet:
    """One rater's complete answers for one image."""

    rater: str
    answers: Mapping[Question, Answer]
    completed_at: datetime  # the time of their last answer

    @property
    def passes(self) -> bool:
        """The paper's rater verdict: a 'yes' to every question."""
        return all(a == Answer.YES for a in self.answers.values())


def _sheets(answers: pa.Table, keys: Sequence[ImageKey]) -> dict[ImageKey, list[_Sheet]]:
    """Each image's complete sheets, in the order they were completed (then by rater).
    A question answered twice by a rater keeps its latest answer (a changed mind)."""
    known = set(keys)
    runs: dict[str, list[str]] = defaultdict(list)
    for run, pid, iid in keys:
        runs[run].append(f"{pid}/{iid}")
    cols = answers.to_pydict()
    latest: dict[tuple[ImageKey, str], dict[Question, tuple[datetime, Answer]]] = defaultdict(dict)
    for i in range(answers.num_rows):
        key = (cols["run"][i], cols["product_id"][i], cols["image_id"][i])
        rater, at = cols["rater"][i], cols["answered_at"][i]
        where = (
            f"answers row {i} (run={key[0]!r}, product_id={key[1]!r}, image_id={key[2]!r}, "
            f"rater={rater!r})"
        )
        try:
            question = Question(cols["question"][i])
        except ValueError:
            raise ValueError(
                f"{where}: question {cols['question'][i]!r} is not a Question; give one of "
                f"{[q.value for q in Question]}"
            ) from None
        try:
            answer = Answer(cols["answer"][i])
        except ValueError:
            raise ValueError(
                f"{where}: answer {cols['answer'][i]!r} is not an Answer; give one of "
                f"{[a.value for a in Answer]}"
            ) from None
        if key not in known:
            if key[0] not in runs:
                valid = f"the runs in images are {sorted(runs)}"
            else:
                shown = runs[key[0]][:5]
                more = len(runs[key[0]]) - len(shown)
                valid = f"run {key[0]!r} has the images {shown}" + (
                    f" and {more} more" if more else ""
                )
            raise ValueError(f"{where}: the image is not in images; {valid}")
        prev = latest[key, rater].get(question)
        if prev is None or at >= prev[0]:
            latest[key, rater][question] = (at, answer)
    sheets: dict[ImageKey, list[_Sheet]] = {key: [] for key in keys}
    for (key, rater), given in latest.items():
        if len(given) == len(Question):
            done = max(at for at, _ in given.values())
            sheets[key].append(_Sheet(rater, {q: a for q, (_, a) in given.items()}, done))
    for found in sheets.values():
        found.sort(key=lambda s: (s.completed_at, s.rater))
    return sheets


def _verdict(sheets: Sequence[_Sheet], config: ReviewConfig) -> bool | None:
    """The image's pass under ``config.pass_rule`` (its description in ray_app.config is
    the definition); None until it has ``raters_per_image`` raters. Every rater counts when
    there are more: a majority of all of them."""
    n = len(sheets)
    if n < config.raters_per_image:
        return None
    if config.pass_rule == "rater_majority":
        return 2 * sum(s.passes for s in sheets) > n
    return all(2 * sum(s.answers[q] == Answer.YES for s in sheets) > n for q in Question)


def _verdict_table(
    images: pa.Table, sheets: Mapping[ImageKey, list[_Sheet]], config: ReviewConfig
) -> pa.Table:
    """The checked ``images`` with their verdict columns filled (RATED_IMAGE_SCHEMA)."""
    keys = _image_keys(images)
    n_raters = [len(sheets[k]) for k in keys]
    passes = [sum(s.passes for s in sheets[k]) for k in keys]
    human = [_verdict(sheets[k], config) for k in keys]
    table = images
    for name, values in zip(VERDICT_COLUMNS, (n_raters, passes, human), strict=True):
        field = RATED_IMAGE_SCHEMA.field(name)
        table = table.set_column(
            RATED_IMAGE_SCHEMA.get_field_index(name), field, pa.array(values, field.type)
        )
    return table.cast(RATED_IMAGE_SCHEMA)


def verdicts(answers: pa.Table, images: pa.Table, config: ReviewConfig) -> pa.Table:
    """``images`` as RATED_IMAGE_SCHEMA, in its order, with each image's ``n_raters``
    (raters who answered all 8 questions), ``rater_passes`` (of them, those who answered
    'yes' to all 8) and ``human_pass`` under ``config.pass_rule`` (None while fewer than
    ``config.raters_per_image`` raters have rated it)."""
    table = _check_images(images)
    sheets = _sheets(_check_answers(answers), _image_keys(table))
    return _verdict_table(table, sheets, config)


# --------------------------------------------------------------------------- statistics


def fleiss_kappa(counts: Sequence[Sequence[int]] | np.ndarray) -> Agreement:
    """Fleiss' kappa (Fleiss 1971) of ``counts[i][j]``: how many raters put subject i in
    category j; every subject needs the same number of raters (at least 2)."""
    n_ij = np.asarray(counts, np.float64)
    if n_ij.size == 0:
        return Agreement(None, None, None, 0, 0)
    if n_ij.ndim != 2 or (n_ij < 0).any() or (n_ij != np.round(n_ij)).any():
        raise ValueError(
            f"counts: give a subjects x categories matrix of non-negative counts, not shape "
            f"{n_ij.shape}"
        )
    per_subject = n_ij.sum(axis=1)
    n = int(per_subject[0])
    if (per_subject != n).any():
        raise ValueError(
            f"counts: every subject needs the same number of raters; the rows sum to "
            f"{sorted(set(per_subject.astype(int).tolist()))}"
        )
    subjects = n_ij.shape[0]
    if n < 2:
        return Agreement(None, None, None, subjects, n)
    p_j = n_ij.sum(axis=0) / (subjects * n)
    p_i = ((n_ij**2).sum(axis=1) - n) / (n * (n - 1))
    observed, expected = float(p_i.mean()), float((p_j**2).sum())
    # Every answer in one category: chance explains all the agreement, kappa is 0/0.
    kappa = None if expected >= 1 - 1e-12 else (observed - expected) / (1 - expected)
    return Agreement(kappa, observed, expected, subjects, n)


def _rng(seed: int, *names: str) -> np.random.Generator:
    """One stream per statistic, stable under reordering of runs and statistics."""
    return np.random.default_rng([seed, *(zlib.crc32(n.encode()) for n in names)])


def _cluster_weights(
    clusters: int, samples: int, rng: np.random.Generator, cells_per_row: int
) -> Iterator[np.ndarray]:
    """Bootstrap resamples of ``clusters`` products as multiplicities: chunks of a
    (samples x clusters) matrix whose row b counts how often resample b drew each product."""
    chunk = max(1, _CHUNK_CELLS // max(cells_per_row, clusters, 1))
    for start in range(0, samples, chunk):
        k = min(chunk, samples - start)
        draws = rng.integers(0, clusters, size=(k, clusters))
        flat = draws + clusters * np.arange(k)[:, None]
        yield np.bincount(flat.ravel(), minlength=k * clusters).reshape(k, clusters)


def _percentile(values: np.ndarray, estimate: float, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    # As ray_app.stats.bootstrap_mean: report an interval that contains the estimate.
    return float(min(lo, estimate)), float(max(hi, estimate))


def _per_image_rate(
    passed: np.ndarray, total: np.ndarray, config: ReviewConfig, rng: np.random.Generator
) -> PassRate:
    """Passing images / rated images, with a percentile bootstrap over products (one entry
    of ``passed``/``total`` per product): the ratio of the resample's sums, so that a
    product weighs by its rated images as in the rate itself."""
    how = "percentile bootstrap over products"
    n_pass, n = int(passed.sum()), int(total.sum())
    if n == 0:
        return PassRate(0, 0, None, None, None, how)
    rate = n_pass / n
    rates = np.concatenate(
        [
            (w @ passed) / (w @ total)
            for w in _cluster_weights(len(total), config.bootstrap_samples, rng, 1)
        ]
    )
    lo, hi = _percentile(rates, rate, config.confidence)
    return PassRate(n_pass, n, rate, lo, hi, how)


def _per_product_rate(passed: int, total: int, confidence: float) -> PassRate:
    """Products with a passing image / rated products, with the Wilson score interval.
    Each product is one independent yes/no, so the count is binomial and needs no
    resampling; Wilson keeps its coverage with the few dozen products of a rating round
    and stays informative at 0% or 100%, where a bootstrap collapses to a single point."""
    how = "Wilson score interval over products"
    if total == 0:
        return PassRate(0, 0, None, None, None, how)
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = passed / total
    denom = 1 + z**2 / total
    centre = (p + z**2 / (2 * total)) / denom
    half = z / denom * np.sqrt(p * (1 - p) / total + z**2 / (4 * total**2))
    return PassRate(
        passed, total, p, float(max(0.0, centre - half)), float(min(1.0, centre + half)), how
    )


class _Ties:
    """The tie groups of a vector, to rank it (average ranks) under any weights."""

    def __init__(self, x: np.ndarray):
        self.order = np.argsort(x, kind="stable")
        values, self.inverse = np.unique(x, return_inverse=True)
        sorted_x = x[self.order]
        self.starts = np.searchsorted(sorted_x, values, side="left")
        self.ends = np.searchsorted(sorted_x, values, side="right")

    def distinct_and_ranks(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row of the weights ``w`` (resamples x n): how many distinct values have
        weight, and each element's average rank in the sample that repeats element i w[i]
        times (the values below it, plus the mean position among its equals)."""
        cum = np.zeros((w.shape[0], w.shape[1] + 1))
        np.cumsum(w[:, self.order], axis=1, out=cum[:, 1:])
        below = cum[:, self.starts]
        equal = cum[:, self.ends] - below
        ranks = below[:, self.inverse] + (equal[:, self.inverse] + 1) / 2
        return (equal > 0).sum(axis=1), ranks


def _weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per row of ``w``: Pearson's r of the sample that repeats element i w[i] times."""
    sw = w.sum(axis=1, keepdims=True)
    dx = x - (w * x).sum(axis=1, keepdims=True) / sw
    dy = y - (w * y).sum(axis=1, keepdims=True) / sw
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (w * dx * dy).sum(axis=1) / np.sqrt((w * dx * dx).sum(axis=1) * (w * dy * dy).sum(1))
    return np.clip(r, -1.0, 1.0)


def _correlations(
    x: np.ndarray, y: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pearson and Spearman r per row of the weights ``w``, and whether they are defined
    (at least 3 images and neither input constant)."""
    tx, ty = _Ties(x), _Ties(y)
    distinct_x, rank_x = tx.distinct_and_ranks(w)
    distinct_y, rank_y = ty.distinct_and_ranks(w)
    defined = (w.sum(axis=1) >= 3) & (distinct_x >= 2) & (distinct_y >= 2)
    return _weighted_pearson(x, y, w), _weighted_pearson(rank_x, rank_y, w), defined


def correlation(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    products: Sequence[str] | None = None,
    *,
    samples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PredictorCorrelation:
    """Pearson's and Spearman's r of ``x`` and ``y`` over the pairs where both are finite,
    each with a percentile-bootstrap interval that resamples ``products`` (the group of each
    pair; None: each pair is its own group). r is None, not NaN, when undefined."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y: give two vectors of one length, not {x.shape} and {y.shape}")
    groups = np.arange(len(x)).astype(str) if products is None else np.asarray(products)
    if groups.shape != x.shape:
        raise ValueError(f"products: give one per pair ({len(x)}), not {groups.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y, groups = x[keep], y[keep], groups[keep]
    names, codes = np.unique(groups, return_inverse=True)
    n, k = len(x), len(names)
    undefined = Correlation(None, None, None, n, k)
    if n < 3:
        return PredictorCorrelation(undefined, undefined)
    pearson, spearman, defined = _correlations(x, y, np.ones((1, n)))
    if not defined[0]:
        return PredictorCorrelation(undefined, undefined)
    rng = np.random.default_rng(seed)
    boot_p, boot_s = [], []
    for counts in _cluster_weights(k, samples, rng, n):
        bp, bs, ok = _correlations(x, y, counts[:, codes].astype(np.float64))
        boot_p.append(bp[ok])
        boot_s.append(bs[ok])
    out = []
    for estimate, boots in ((pearson[0], boot_p), (spearman[0], boot_s)):
        values = np.concatenate(boots)
        # Resamples whose inputs came out constant have no r; the interval is over the rest.
        lo, hi = _percentile(values, float(estimate), confidence) if values.size else (None, None)
        out.append(Correlation(float(estimate), lo, hi, n, k))
    return PredictorCorrelation(*out)


def _group_results(
    name: str,
    table: pa.Table,
    sheets: Mapping[ImageKey, list[_Sheet]],
    config: ReviewConfig,
    seed: int,
    correlate: bool,
) -> GroupResults:
    cols = table.to_pydict()
    keys = list(zip(*(cols[n] for n in IMAGE_KEY), strict=True))
    human = cols["human_pass"]
    rated = [i for i, h in enumerate(human) if h is not None]

    # Per image: clustered by product_id, so that pooled runs resample a product's images
    # in every run together (the same product's runs are not independent either).
    per_pid: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    per_unit: dict[tuple[str, str], bool] = {}
    for i in rated:
        run, pid, _ = keys[i]
        per_pid[pid][0] += human[i]
        per_pid[pid][1] += 1
        per_unit[run, pid] = per_unit.get((run, pid), False) or human[i]
    counts = np.array(list(per_pid.values()), np.float64).reshape(-1, 2)
    per_image = _per_image_rate(counts[:, 0], counts[:, 1], config, _rng(seed, name, "image"))
    # Per product: the unit is a run's product (pooled runs count a product once per run).
    per_product = _per_product_rate(sum(per_unit.values()), len(per_unit), config.confidence)

    # Agreement: the first raters_per_image raters of each rated image (Fleiss' kappa needs
    # the same number of raters per image; extra raters would weigh their images more).
    k = config.raters_per_image
    first = [sheets[keys[i]][:k] for i in rated]
    agreement = {
        q.value: fleiss_kappa(
            [[sum(s.answers[q] == a for s in ss) for a in Answer] for ss in first]
        )
        for q in Question
    }
    pass_agreement = fleiss_kappa(
        [[sum(s.passes for s in ss), k - sum(s.passes for s in ss)] for ss in first]
    )

    correlations = None
    if correlate:
        y = np.array([float(human[i]) for i in rated])
        products = [keys[i][1] for i in rated]
        correlations = {}
        for p in PREDICTORS:
            x = np.array([np.nan if cols[p][i] is None else cols[p][i] for i in rated], np.float64)
            correlations[p] = correlation(
                x,
                y,
                products,
                samples=config.bootstrap_samples,
                confidence=config.confidence,
                seed=int(_rng(seed, name, "correlation", p).integers(2**32)),
            )
    return GroupResults(
        images=len(keys),
        images_rated=len(rated),
        images_pending=len(keys) - len(rated),
        products=len({(r, p) for r, p, _ in keys}),
        products_rated=len(per_unit),
        per_image=per_image,
        per_product=per_product,
        agreement=agreement,
        pass_agreement=pass_agreement,
        correlations=correlations,
    )


def summarize(
    answers: pa.Table, images: pa.Table, config: ReviewConfig, *, seed: int = 0
) -> ReviewSummary:
    """The statistics of a rating round, per run and over every run: images rated and
    pending, pass rates per image and per product with intervals, Fleiss' kappa per
    question, and (per run) the correlations of each metric and the score with the human
    pass. Seeded: the same inputs and seed give the same intervals."""
    checked = _check_images(images)
    sheets = _sheets(_check_answers(answers), _image_keys(checked))
    table = _verdict_table(checked, sheets, config)
    runs = sorted(set(table["run"].to_pylist()))
    return ReviewSummary(
        pass_rule=config.pass_rule,
        raters_per_image=config.raters_per_image,
        confidence=config.confidence,
        bootstrap_samples=config.bootstrap_samples,
        seed=seed,
        runs={
            run: _group_results(
                f"run:{run}",
                table.filter(pc.equal(table["run"], run)),
                sheets,
                config,
                seed,
                correlate=True,
            )
            for run in runs
        },
        overall=_group_results(_OVERALL, table, sheets, config, seed, correlate=False),
    )


# --------------------------------------------------------------------------- writer


def write_results(
    out_uri: str, answers: pa.Table, verdict_table: pa.Table, summary: ReviewSummary
) -> ResultFiles:
    """Write the round's results under the folder ``out_uri`` (any fsspec URI): every answer
    (answers.parquet, and answers.csv with UTC ISO-8601 times), the verdicts (images.parquet,
    RATED_IMAGE_SCHEMA: what `restage ranker fit --ratings` reads) and summary.json."""
    answers = _check_answers(answers)
    if not verdict_table.schema.equals(RATED_IMAGE_SCHEMA):
        raise ValueError(
            "verdict_table: give the table verdicts() returns (RATED_IMAGE_SCHEMA); its "
            f"schema is {verdict_table.schema}"
        )
    if not isinstance(summary, ReviewSummary):
        raise ValueError(f"summary: give the ReviewSummary summarize() returns, not {summary!r}")
    root = storage.normalize_uri(out_uri)
    when = pc.strftime(answers["answered_at"], format="%Y-%m-%dT%H:%M:%SZ")
    as_text = answers.set_column(answers.schema.get_field_index("answered_at"), "answered_at", when)
    csv = io.BytesIO()
    pa_csv.write_csv(as_text, csv)
    return ResultFiles(
        answers_parquet=storage.write_parquet(storage.join(root, ANSWERS_PARQUET), answers),
        answers_csv=storage.write_bytes(storage.join(root, ANSWERS_CSV), csv.getvalue()),
        images_parquet=storage.write_parquet(storage.join(root, IMAGES_PARQUET), verdict_table),
        summary_json=storage.write_json(storage.join(root, SUMMARY_JSON), summary.to_dict()),
    )


def read_answers_csv(uri: str) -> pa.Table:
    """answers.csv back as ANSWER_SCHEMA (its times parsed as UTC)."""
    with storage.open_file(uri, "rb") as f:
        table = pa_csv.read_csv(
            f,
            convert_options=pa_csv.ConvertOptions(
                column_types={field.name: field.type for field in ANSWER_SCHEMA}
            ),
        )
    return table.select(ANSWER_SCHEMA.names).cast(ANSWER_SCHEMA)
