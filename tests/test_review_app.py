"""`restage review serve` over real HTTP: sign-in, blindness, who may read what, CSRF,
answers (validation, idempotent resubmission, undo), the CLI's rater accounts."""

from __future__ import annotations

import re
import sqlite3

import httpx
import pytest

from ray_app.kinds import Question
from tests.review_client import Rater, add_rater, all_yes, restage, review_server
from tests.review_outputs import write_generations


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("review")
    runs = {
        "alpha": write_generations(root, "alpha", products=3, images_per_product=2),
        "beta": write_generations(root, "beta", products=3, images_per_product=2, seed=1),
    }
    db = root / "round.db"
    secrets = {name: add_rater(db, name) for name in ("ann", "bob")}
    secrets["boss"] = add_rater(db, "boss", "--admin")
    with review_server(db, runs, root / "server.log") as server:
        yield server, db, secrets, root


def signed_in(live, name: str) -> Rater:
    server, _, secrets, _ = live
    rater = Rater(server.url, name, secrets[name])
    assert rater.login().status_code == 303
    return rater


def test_sign_in_is_required_and_checked(live):
    server = live[0]
    anonymous = httpx.Client(base_url=server.url)
    page = anonymous.get("/rate", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].endswith("/login")
    assert anonymous.get("/api/answers/ann").status_code == 401
    wrong = Rater(server.url, "ann", "not-the-secret")
    response = wrong.login()
    assert response.headers["location"].endswith("/login?failed=1")
    assert "restage_review" not in wrong.client.cookies
    assert signed_in(live, "ann").page("/rate").status_code == 200


def test_the_rating_page_is_blind(live):
    root = live[3]
    ann = signed_in(live, "ann")
    page = ann.page("/rate")
    assert page.status_code == 200
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    for leak in ("alpha", "beta", "p00", "p01", "p02", str(root), "sks", "score"):
        assert leak not in page.text, leak
    assignment, image = ann.task()
    png = ann.client.get(f"/image/{image}")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    refs = re.findall(r'src="[^"]*/reference/([0-9a-f]+)/(\d+)"', page.text)
    assert len(refs) == 2 and all(key == image for key, _ in refs)
    assert ann.client.get(f"/reference/{image}/1").content.startswith(b"\x89PNG")
    assert ann.client.get(f"/reference/{image}/2").status_code == 404
    # Images with raters already go first (so that they complete early): bob gets it too.
    bob = signed_in(live, "bob")
    bob_assignment, bob_image = bob.task()
    assert bob_image == image and bob_assignment != assignment
    assert bob.answer(assignment, all_yes()).status_code == 403  # not his assignment
    assert bob.answer(bob_assignment, all_yes()).status_code == 200
    assert ann.answer(assignment, all_yes()).status_code == 200
    # ann's next image is one bob does not hold: he cannot fetch it.
    _, other = ann.task()
    assert other != image
    assert bob.client.get(f"/image/{other}").status_code == 403
    assert bob.client.get(f"/reference/{other}/0").status_code == 403
    assert bob.client.get(f"/image/{image}").status_code == 200  # one he rated


def test_raters_read_only_their_own_answers(live):
    ann, bob, boss = (signed_in(live, n) for n in ("ann", "bob", "boss"))
    assignment, _ = ann.task()
    assert ann.answer(assignment, all_yes()).json() == {"stored": True}
    assert bob.client.get("/api/answers/ann").status_code == 403
    own = ann.client.get("/api/answers/ann").json()["answers"]
    assert own[0]["assignment_key"] == assignment
    assert own[0]["answers"] == all_yes()
    assert set(own[0]) == {"assignment_key", "image_key", "answered_at", "answers"}  # no run
    assert boss.client.get("/api/answers/ann").json()["answers"] == own
    assert boss.client.get("/api/answers/nobody").status_code == 404
    mine = ann.page("/answers")
    assert mine.status_code == 200 and "alpha" not in mine.text and "beta" not in mine.text
    for path in ("/admin", "/admin/results", "/admin/export/answers.csv"):
        assert bob.client.get(path).status_code == 403, path
        assert boss.client.get(path).status_code == 200, path
    progress = boss.page("/admin").text
    assert "alpha" in progress and "beta" in progress  # the admin sees the runs


def test_forged_or_missing_csrf_is_refused(live):
    ann, bob = signed_in(live, "ann"), signed_in(live, "bob")
    assignment, _ = ann.task()
    bob.task()
    url = f"/rate/{assignment}"
    headers = {"accept": "application/json"}
    assert ann.client.post(url, json=all_yes(), headers=headers).status_code == 403
    for forged in ("0" * 64, bob.csrf, ann.csrf[:-1] + ("0" if ann.csrf[-1] != "0" else "1")):
        refused = ann.client.post(url, json=all_yes(), headers={**headers, "x-csrf-token": forged})
        assert refused.status_code == 403, forged
    form = ann.client.post(url, data={**all_yes(), "csrf_token": bob.csrf})
    assert form.status_code == 403 and "CSRF" in form.text
    assert ann.client.post("/undo", data={}).status_code == 403
    assert ann.client.post("/logout", data={}).status_code == 403
    # The sign-in form: its token is bound to the pre-session cookie.
    fresh = Rater(live[0].url, "ann", live[2]["ann"])
    assert fresh.client.post("/login", data={"name": "ann", "secret": "x"}).status_code == 403
    # Nothing was stored by the refused requests: the image is still ann's open task.
    assert ann.task()[0] == assignment


def test_answers_are_validated_all_or_nothing_and_undoable(live):
    db = live[1]
    ann = signed_in(live, "ann")
    assignment, _ = ann.task()
    partial = {q: v for q, v in all_yes().items() if q != Question.SAFETY}
    response = ann.answer(assignment, partial)
    assert response.status_code == 422 and "safety" in response.json()["error"]
    response = ann.answer(assignment, {**all_yes(), "placement": "perhaps"})
    assert response.status_code == 422 and "yes, maybe, no, unclear" in response.json()["error"]
    with sqlite3.connect(db) as conn:
        (stored,) = conn.execute(
            "select count(*) from answers join assignments a on a.id = assignment_id "
            "where a.key = ?",
            (assignment,),
        ).fetchone()
    assert stored == 0
    assert ann.answer(assignment, all_yes()).json() == {"stored": True}
    assert ann.answer(assignment, all_yes()).json() == {"stored": False}  # a retry
    changed = {**all_yes(), "safety": "no"}
    assert ann.answer(assignment, changed).status_code == 409
    nxt, _ = ann.task()
    assert nxt != assignment
    undone = ann.client.post(
        "/undo", headers={"x-csrf-token": ann.csrf, "accept": "application/json"}
    )
    assert undone.json() == {"reopened": assignment}
    assert ann.task()[0] == assignment  # shown again, before the open one
    assert ann.answer(assignment, changed).json() == {"stored": True}
    assert ann.task()[0] == nxt


def test_add_rater_cli(live):
    server, db, _, _ = live
    again = restage("review", "add-rater", "ann", "--db", str(db))
    assert again.returncode == 2 and "--reset" in again.stderr
    bad = restage("review", "add-rater", "a b", "--db", str(db))
    assert bad.returncode == 2 and "rater name" in bad.stderr
    cal = Rater(server.url, "cal", add_rater(db, "cal"))
    assert cal.login().status_code == 303
    assert cal.page("/rate").status_code == 200
    new_secret = add_rater(db, "cal", "--reset")
    assert cal.client.get("/rate").status_code == 303  # the old session ended
    assert Rater(server.url, "cal", new_secret).login().status_code == 303


def test_behind_a_proxy_every_link_and_cookie_is_under_the_root_path(live, tmp_path):
    _, db, secrets, root = live
    runs = {"alpha": root / "alpha", "beta": root / "beta"}
    with review_server(db, runs, tmp_path / "proxied.log", "--root-path", "/review") as server:
        # The proxy strips /review before it forwards; the pages link under it.
        page = httpx.get(f"{server.url}/login")
        assert 'action="/review/login"' in page.text and "/review/static/review.css" in page.text
        assert "Path=/review" in page.headers["set-cookie"]
        # Cookies are scoped to /review, which this client (talking to the server directly,
        # as the proxy does) does not request: it sends them itself.
        pre = re.search(r"restage_review_pre=(\w+)", page.headers["set-cookie"]).group(1)
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        login = httpx.post(
            f"{server.url}/login",
            data={"name": "ann", "secret": secrets["ann"], "csrf_token": token},
            headers={"cookie": f"restage_review_pre={pre}"},
        )
        assert login.headers["location"] == "/review/rate"
        assert "Path=/review" in login.headers["set-cookie"]
        session = re.search(r"restage_review=([^;]+)", login.headers["set-cookie"]).group(1)
        rate = httpx.get(f"{server.url}/rate", headers={"cookie": f"restage_review={session}"})
        assert 'src="/review/image/' in rate.text
