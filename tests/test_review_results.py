"""serve/review/results.py: verdicts, pass rates, Fleiss' kappa, correlations and the writer
of a human rating round, on hand-built answers (no Ray, no app)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats as sps

from ray_app import storage
from ray_app.config import ReviewConfig
from ray_app.kinds import Answer, Metric, Question
from ray_app.records import ANSWER_SCHEMA, RATED_IMAGE_SCHEMA
from serve.review.results import (
    PREDICTORS,
    VERDICT_COLUMNS,
    ReviewSummary,
    correlation,
    fleiss_kappa,
    read_answers_csv,
    summarize,
    verdicts,
    write_results,
)

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
YES, MAYBE, NO, UNCLEAR = Answer.YES, Answer.MAYBE, Answer.NO, Answer.UNCLEAR
IMAGE_COLUMNS = [f for f in RATED_IMAGE_SCHEMA if f.name not in VERDICT_COLUMNS]


def sheet(run, pid, iid, rater, differ=None, *, questions=None, minute=0):
    """A rater's answers to one image: 'yes' except the questions in ``differ``; only the
    first ``questions`` questions when given (an unfinished sheet)."""
    differ = differ or {}
    asked = list(Question)[:questions] if questions is not None else list(Question)
    return [
        {
            "run": run,
            "product_id": pid,
            "image_id": iid,
            "rater": rater,
            "question": q.value,
            "answer": differ.get(q, YES).value,
            "answered_at": T0 + timedelta(minutes=minute, seconds=j),
        }
        for j, q in enumerate(asked)
    ]


def answers_table(rows):
    return pa.Table.from_pylist(rows, schema=ANSWER_SCHEMA)


def images_table(keys, metrics=None):
    """The images put to raters, without the verdict columns (as the app builds them)."""
    rows = []
    for i, (run, pid, iid) in enumerate(keys):
        row = {"run": run, "product_id": pid, "image_id": iid, "image_uri": f"memory://{iid}.png"}
        row |= {"prompt": "a chair in a loft", "ranking": "weighted", "score": 0.1 * i}
        row |= {m.value: 0.5 for m in Metric}
        row |= (metrics or {}).get((run, pid, iid), {})
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=pa.schema(IMAGE_COLUMNS))


# The hand-built round: 2 runs, 3 raters per image.
#   ours/A/a1: r1, r2 all yes; r3 says 'no' to LOGO_TEXT          -> 2 of 3: pass
#   ours/A/a2: r1 all yes; r2 'unclear' on SAFETY; r3 'maybe' on PLACEMENT -> 1 of 3: fail
#   ours/B/b1: all three say 'no' to PRODUCT_FIDELITY             -> 0 of 3: fail
#   ours/B/b2: r1, r2 all yes; r3 stopped after 5 questions       -> 2 raters: pending
#   ours/C/c1: all yes                                            -> 3 of 3: pass
#   base/A/a1: r1 all yes; r2, r3 'no' to BUSINESS_USE            -> 1 of 3: fail
#   base/A/a2: r1, r3 all yes; r2 'maybe' on PRODUCT_SIZE         -> 2 of 3: pass
#   base/B/b1: all 'no' to NO_HALLUCINATIONS                      -> 0 of 3: fail
KEYS = [
    ("ours", "A", "a1"),
    ("ours", "A", "a2"),
    ("ours", "B", "b1"),
    ("ours", "B", "b2"),
    ("ours", "C", "c1"),
    ("base", "A", "a1"),
    ("base", "A", "a2"),
    ("base", "B", "b1"),
]
DIFFER = {
    ("ours", "A", "a1"): [{}, {}, {Question.LOGO_TEXT: NO}],
    ("ours", "A", "a2"): [{}, {Question.SAFETY: UNCLEAR}, {Question.PLACEMENT: MAYBE}],
    ("ours", "B", "b1"): [{Question.PRODUCT_FIDELITY: NO}] * 3,
    ("ours", "C", "c1"): [{}, {}, {}],
    ("base", "A", "a1"): [{}, {Question.BUSINESS_USE: NO}, {Question.BUSINESS_USE: NO}],
    ("base", "A", "a2"): [{}, {Question.PRODUCT_SIZE: MAYBE}, {}],
    ("base", "B", "b1"): [{Question.NO_HALLUCINATIONS: NO}] * 3,
}


def round_answers():
    rows = []
    for key, per_rater in DIFFER.items():
        for r, differ in enumerate(per_rater):
            rows += sheet(*key, f"r{r + 1}", differ, minute=r)
    rows += sheet("ours", "B", "b2", "r1") + sheet("ours", "B", "b2", "r2", minute=1)
    rows += sheet("ours", "B", "b2", "r3", questions=5, minute=2)
    return answers_table(rows)


CONFIG = ReviewConfig(bootstrap_samples=500)


def test_verdicts_of_the_hand_built_round():
    table = verdicts(round_answers(), images_table(KEYS), CONFIG)
    assert table.schema.equals(RATED_IMAGE_SCHEMA)
    got = {
        (r["run"], r["product_id"], r["image_id"]): (
            r["n_raters"],
            r["rater_passes"],
            r["human_pass"],
        )
        for r in table.to_pylist()
    }
    assert got == {
        ("ours", "A", "a1"): (3, 2, True),
        ("ours", "A", "a2"): (3, 1, False),  # an 'unclear' and a 'maybe' are not passes
        ("ours", "B", "b1"): (3, 0, False),
        ("ours", "B", "b2"): (2, 2, None),  # r3's 5 answers do not count: pending
        ("ours", "C", "c1"): (3, 3, True),
        ("base", "A", "a1"): (3, 1, False),
        ("base", "A", "a2"): (3, 2, True),
        ("base", "B", "b1"): (3, 0, False),
    }
    # The input's order and its id/metric columns are kept.
    assert table.select([f.name for f in IMAGE_COLUMNS]).equals(images_table(KEYS))


def test_pass_rates_of_the_hand_built_round():
    summary = summarize(round_answers(), images_table(KEYS), CONFIG, seed=3)
    ours, base, overall = summary.runs["ours"], summary.runs["base"], summary.overall
    # ours: rated a1 (pass), a2, b1, c1 (pass); b2 pending.   per image = 2/4 = 0.5
    #       products A (a1 passes), B (b1 fails, b2 pending), C (c1 passes): per product 2/3
    assert (ours.images, ours.images_rated, ours.images_pending) == (5, 4, 1)
    assert (ours.per_image.passed, ours.per_image.total, ours.per_image.rate) == (2, 4, 2 / 4)
    assert (ours.products, ours.products_rated) == (3, 3)
    assert (ours.per_product.passed, ours.per_product.total) == (2, 3)
    assert ours.per_product.rate == pytest.approx(2 / 3)
    # base: a1 fails, a2 passes, b1 fails: per image 1/3; products A yes, B no: 1/2
    assert (base.per_image.passed, base.per_image.total) == (1, 3)
    assert (base.per_product.passed, base.per_product.total) == (1, 2)
    # overall: (2 + 1) / (4 + 3) = 3/7 images; (2 + 1) / (3 + 2) = 3/5 run-products
    assert overall.per_image.rate == pytest.approx(3 / 7)
    assert overall.per_product.rate == pytest.approx(3 / 5)
    assert (overall.images, overall.images_pending) == (8, 1)
    for group in (ours, base, overall):
        for rate in (group.per_image, group.per_product):
            assert 0 <= rate.lo <= rate.rate <= rate.hi <= 1
    # Wilson 95% of 2/3: z = 1.95996, centre (2/3 + z²/6)/(1 + z²/3) = 0.5731,
    # half-width z/(1 + z²/3) * sqrt((2/3)(1/3)/3 + z²/36) = 0.3654
    assert ours.per_product.lo == pytest.approx(0.2077, abs=1e-4)
    assert ours.per_product.hi == pytest.approx(0.9385, abs=1e-4)
    # Seeded: the same seed gives the same intervals.
    again = summarize(round_answers(), images_table(KEYS), CONFIG, seed=3)
    assert again == summary


def test_kappa_of_one_question_by_hand():
    summary = summarize(round_answers(), images_table(KEYS), CONFIG)
    # ours, LOGO_TEXT over the rated images (yes, maybe, no, unclear):
    #   a1 [2,0,1,0], a2 [3,0,0,0], b1 [3,0,0,0], c1 [3,0,0,0]
    #   P_i: a1 (4 + 1 - 3) / (3 * 2) = 1/3, the others 1  -> P-bar = (1/3 + 3)/4 = 5/6
    #   p_yes = 11/12, p_no = 1/12 -> P-e = 121/144 + 1/144 = 122/144
    #   kappa = (120/144 - 122/144) / (22/144) = -1/11
    logo = summary.runs["ours"].agreement[Question.LOGO_TEXT]
    assert (logo.images, logo.raters) == (4, 3)
    assert logo.observed == pytest.approx(5 / 6)
    assert logo.expected == pytest.approx(122 / 144)
    assert logo.kappa == pytest.approx(-1 / 11)
    # PRODUCT_FIDELITY in ours: b1's three 'no' and 9 'yes' elsewhere; full agreement on
    # every image -> P-bar = 1, kappa = 1
    assert summary.runs["ours"].agreement[Question.PRODUCT_FIDELITY].kappa == pytest.approx(1)
    assert set(summary.overall.agreement) == {q.value for q in Question}


def test_fleiss_kappa_matches_the_textbook_example():
    # Wikipedia's worked example of Fleiss' kappa: 10 subjects, 14 raters, 5 categories;
    # P-bar = 0.378, P-e = 0.213, kappa = 0.210.
    counts = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    k = fleiss_kappa(counts)
    assert (k.images, k.raters) == (10, 14)
    assert k.observed == pytest.approx(0.378, abs=5e-4)
    assert k.expected == pytest.approx(0.213, abs=5e-4)
    assert k.kappa == pytest.approx(0.210, abs=5e-4)
    # Undefined rather than NaN: every answer in one category, or a single rater.
    assert fleiss_kappa([[3, 0], [3, 0]]).kappa is None
    assert fleiss_kappa([[1, 0], [0, 1]]).kappa is None
    assert fleiss_kappa([[3, 0], [0, 3]]).kappa == pytest.approx(1)
    with pytest.raises(ValueError, match="same number of raters"):
        fleiss_kappa([[3, 0], [1, 1]])


def test_pass_rules_differ_as_described():
    # Each rater says 'no' to a different question: no rater passes the image
    # (rater_majority: 0 of 3), yet every question has 2 'yes' of 3 (question_majority).
    key = ("r", "p", "split")
    rows = []
    for r, q in enumerate([Question.LOGO_TEXT, Question.SAFETY, Question.PLACEMENT]):
        rows += sheet(*key, f"r{r}", {q: NO}, minute=r)
    # ... and an image two raters reject on the same question fails under both rules.
    same = ("r", "p", "same")
    rows += sheet(*same, "r0") + sheet(*same, "r1", {Question.SAFETY: NO})
    rows += sheet(*same, "r2", {Question.SAFETY: MAYBE})
    answers, images = answers_table(rows), images_table([key, same])
    paper = verdicts(answers, images, ReviewConfig(pass_rule="rater_majority"))
    lenient = verdicts(answers, images, ReviewConfig(pass_rule="question_majority"))
    assert paper["human_pass"].to_pylist() == [False, False]
    assert lenient["human_pass"].to_pylist() == [True, False]
    assert paper["rater_passes"].to_pylist() == lenient["rater_passes"].to_pylist() == [0, 1]


def test_question_majority_is_never_stricter_on_random_rounds():
    rng = np.random.default_rng(0)
    answers_set = list(Answer)
    rows, keys = [], []
    for i in range(200):
        key = ("r", f"p{i % 20}", f"i{i}")
        keys.append(key)
        for r in range(int(rng.integers(3, 6))):
            differ = {
                q: answers_set[int(rng.choice(4, p=[0.9, 0.04, 0.03, 0.03]))] for q in Question
            }
            rows += sheet(*key, f"r{r}", differ, minute=r)
    answers, images = answers_table(rows), images_table(keys)
    paper = verdicts(answers, images, ReviewConfig(pass_rule="rater_majority"))["human_pass"]
    lenient = verdicts(answers, images, ReviewConfig(pass_rule="question_majority"))
    paper, lenient = paper.to_pylist(), lenient["human_pass"].to_pylist()
    assert all(q for p, q in zip(paper, lenient, strict=True) if p)
    assert sum(lenient) > sum(paper)  # the round is built so that the rules do differ


def test_extra_raters_and_repeated_answers():
    key = ("r", "p", "i")
    # Four raters, two pass: a majority needs more than half of all four -> fail.
    rows = sheet(*key, "a") + sheet(*key, "b", minute=1)
    rows += sheet(*key, "c", {Question.SAFETY: NO}, minute=2)
    rows += sheet(*key, "d", {Question.SAFETY: NO}, minute=3)
    table = verdicts(answers_table(rows), images_table([key]), CONFIG)
    assert (table["n_raters"][0].as_py(), table["rater_passes"][0].as_py()) == (4, 2)
    assert table["human_pass"][0].as_py() is False
    # A rater who answers a question again: the later answer counts ('no' -> 'yes').
    rows += sheet(*key, "c", minute=9)
    table = verdicts(answers_table(rows), images_table([key]), CONFIG)
    assert (table["n_raters"][0].as_py(), table["rater_passes"][0].as_py()) == (4, 3)
    assert table["human_pass"][0].as_py() is True
    # Kappa counts the first 3 raters to finish (a, b, c), as Fleiss' kappa needs.
    summary = summarize(answers_table(rows), images_table([key]), CONFIG)
    assert summary.runs["r"].agreement[Question.SAFETY].raters == 3


def test_per_image_interval_resamples_products_not_images():
    # One product with 10 rated images (half pass): resampling products cannot move the
    # rate, so the interval is the point; resampling images would give a wide one.
    keys = [("r", "only", f"i{i}") for i in range(10)]
    rows = []
    for i, key in enumerate(keys):
        for r in range(3):
            rows += sheet(*key, f"r{r}", {} if i % 2 else {Question.SAFETY: NO}, minute=r)
    one = summarize(answers_table(rows), images_table(keys), CONFIG).runs["r"].per_image
    assert (one.rate, one.lo, one.hi) == (0.5, 0.5, 0.5)
    # Ten products of one image each: now the interval has width.
    keys10 = [("r", f"p{i}", "i") for i in range(10)]
    rows10 = []
    for i, key in enumerate(keys10):
        for r in range(3):
            rows10 += sheet(*key, f"r{r}", {} if i % 2 else {Question.SAFETY: NO}, minute=r)
    ten = summarize(answers_table(rows10), images_table(keys10), CONFIG).runs["r"].per_image
    assert ten.rate == 0.5 and ten.lo < 0.4 and ten.hi > 0.6


def test_correlation_matches_scipy_and_is_none_when_undefined():
    rng = np.random.default_rng(1)
    x = np.round(rng.normal(size=40), 1)  # rounded: ties, which Spearman averages
    y = (x + rng.normal(size=40) > 0).astype(float)
    x[[3, 17]] = np.nan  # dropped pairwise
    products = [f"p{i // 4}" for i in range(40)]
    got = correlation(x, y, products, samples=300, seed=2)
    keep = np.isfinite(x)
    assert got.pearson.r == pytest.approx(sps.pearsonr(x[keep], y[keep]).statistic, abs=1e-12)
    assert got.spearman.r == pytest.approx(sps.spearmanr(x[keep], y[keep]).statistic, abs=1e-12)
    assert (got.pearson.n, got.pearson.products) == (38, 10)
    for c in (got.pearson, got.spearman):
        assert -1 <= c.lo <= c.r <= c.hi <= 1
    # A resample's r with repeated products is the r of the expanded sample (what the
    # bootstrap computes with weights): products 0 and 1 drawn twice.
    twice = np.concatenate([np.arange(8), np.arange(40)])
    expanded = correlation(x[twice], y[twice], samples=10)
    assert expanded.spearman.r == pytest.approx(
        sps.spearmanr(x[twice][np.isfinite(x[twice])], y[twice][np.isfinite(x[twice])]).statistic
    )
    # Undefined: a constant input, fewer than 3 pairs.
    assert correlation(np.ones(10), y[:10]).pearson.r is None
    assert correlation(x[:10], np.zeros(10)).spearman.r is None
    short = correlation([0.1, 0.2, np.nan], [0.0, 1.0, 1.0])
    assert (short.pearson.r, short.spearman.lo, short.pearson.n) == (None, None, 2)


def test_summary_correlations_per_run_are_json_safe():
    # ours's rated images a1, a2, b1, c1 pass as 1, 0, 0, 1; clip_i follows the verdict,
    # dino is constant, and seg_dino is NaN on a2 (dropped pairwise).
    values = {
        ("ours", "A", "a1"): {"clip_i": 0.9, "seg_dino": 0.7},
        ("ours", "A", "a2"): {"clip_i": 0.3, "seg_dino": None},
        ("ours", "B", "b1"): {"clip_i": 0.4, "seg_dino": 0.2},
        ("ours", "C", "c1"): {"clip_i": 0.8, "seg_dino": 0.6},
    }
    summary = summarize(round_answers(), images_table(KEYS, values), CONFIG)
    ours = summary.runs["ours"].correlations
    assert set(ours) == set(PREDICTORS)
    y = [1, 0, 0, 1]
    clip_i = [0.9, 0.3, 0.4, 0.8]
    assert ours["clip_i"].pearson.r == pytest.approx(sps.pearsonr(clip_i, y).statistic)
    assert ours["clip_i"].spearman.r == pytest.approx(sps.spearmanr(clip_i, y).statistic)
    assert ours["dino"].pearson.r is None  # every image has 0.5
    assert ours["seg_dino"].pearson.n == 3
    assert ours["seg_dino"].pearson.r == pytest.approx(
        sps.pearsonr([0.7, 0.2, 0.6], [1, 0, 1]).statistic
    )
    assert summary.overall.correlations is None
    # summary.json holds no NaN, and reads back as the same summary.
    text = json.dumps(summary.to_dict(), allow_nan=False)
    assert ReviewSummary.from_dict(json.loads(text)) == summary


@pytest.mark.parametrize("root", ["memory", "local"])
def test_writer_round_trip(root, tmp_path):
    out = f"memory://review-{uuid.uuid4().hex}" if root == "memory" else str(tmp_path / "out")
    answers, images = round_answers(), images_table(KEYS)
    table = verdicts(answers, images, CONFIG)
    summary = summarize(answers, images, CONFIG)
    files = write_results(out, answers, table, summary)
    back = storage.read_parquet(files.answers_parquet)
    assert back.schema.equals(ANSWER_SCHEMA) and back.num_rows == answers.num_rows
    assert back.equals(answers)
    csv = read_answers_csv(files.answers_csv)
    assert csv.schema.equals(ANSWER_SCHEMA) and csv.equals(answers)
    text = storage.read_bytes(files.answers_csv).decode()
    assert "2026-12-01T09:00:00.000000Z" in text  # UTC ISO 8601
    rated = storage.read_parquet(files.images_parquet)
    assert rated.schema.equals(RATED_IMAGE_SCHEMA) and rated.equals(table)
    assert ReviewSummary.from_dict(storage.read_json(files.summary_json)) == summary
    with pytest.raises(ValueError, match="RATED_IMAGE_SCHEMA"):
        write_results(out, answers, images, summary)


def test_invalid_answers_name_the_row_and_the_valid_values():
    good = sheet("ours", "A", "a1", "r1")
    images = images_table(KEYS)
    bad_q = [*good[:7], good[7] | {"question": "colour"}]
    with pytest.raises(ValueError, match=r"image_id='a1', rater='r1'.*'colour'.*product_fidelity"):
        verdicts(answers_table(bad_q), images, CONFIG)
    bad_a = [good[0] | {"answer": "sort of"}, *good[1:]]
    with pytest.raises(ValueError, match=r"rater='r1'.*'sort of'.*'yes', 'maybe', 'no', 'unclear'"):
        summarize(answers_table(bad_a), images, CONFIG)
    stray = sheet("ours", "A", "zz", "r1")
    with pytest.raises(ValueError, match=r"image_id='zz'.*not in images.*'A/a1'"):
        verdicts(answers_table(stray), images, CONFIG)
    with pytest.raises(ValueError, match=r"run='nope'.*runs in images are \['base', 'ours'\]"):
        verdicts(answers_table(sheet("nope", "A", "a1", "r1")), images, CONFIG)
    with pytest.raises(ValueError, match="answers lacks the columns"):
        verdicts(answers_table(good).drop_columns(["rater"]), images, CONFIG)
    with pytest.raises(ValueError, match="images lacks the columns"):
        verdicts(answers_table(good), images.drop_columns(["clip_i"]), CONFIG)
    with pytest.raises(ValueError, match="appears twice"):
        verdicts(answers_table(good), pa.concat_tables([images, images]), CONFIG)


def test_no_answers_yet_is_all_pending():
    summary = summarize(answers_table([]), images_table(KEYS), CONFIG)
    ours = summary.runs["ours"]
    assert (ours.images_rated, ours.images_pending) == (0, 5)
    assert ours.per_image.rate is None and ours.per_product.lo is None
    assert ours.agreement[Question.SAFETY].kappa is None
    assert ours.correlations["score"].pearson.r is None
    json.dumps(summary.to_dict(), allow_nan=False)
