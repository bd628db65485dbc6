"""`cliplab serve`: the API answers what the library answers (search, embed, CLIP4DM), refusals are one-line with the
right status, thumbnails never leave the index, concurrent queries share one model call, metrics count."""

from __future__ import annotations

import functools
import io
import re
import socket
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import cliplab
import cliplab.data
from cliplab.cli import main
from cliplab.index import Index
from cliplab.pipeline import embed

pytest.importorskip("fastapi", reason="cliplab serve needs FastAPI: pip install 'cliplab[serve]'")
pytest.importorskip("multipart", reason="cliplab serve needs python-multipart: pip install 'cliplab[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from cliplab.server import MicroBatcher, SearchService, ServeSettings, create_app  # noqa: E402


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def blank_png(side: int) -> bytes:
    """A 1-bit black square as PNG: 12000 -> 144 M pixels in a few kB (over PIL's own decompression-bomb limit);
    9000 -> 81 M (under PIL's limit, over the server's 50 M)."""
    return png_bytes(Image.new("1", (side, side)))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """17 scenes as files (one in a subfolder), one of them a symlink to an image outside the folder, embedded with the shipped model and
    indexed (images); plus the same scenes' captions as a text index."""
    base = tmp_path_factory.mktemp("serve")
    world = cliplab.data.SceneWorld(image_size=64, seed=0)
    photos, outside = base / "photos", base / "outside"
    photos.mkdir()
    outside.mkdir()
    for i in range(15):
        world.sample(i).render().save(photos / f"s{i:02d}.png")
    world.sample(99).render().save(outside / "secret.png")
    (photos / "link.png").symlink_to(outside / "secret.png")
    (photos / "sub").mkdir()
    world.sample(15).render().save(photos / "sub" / "s15.png")  # an id with a slash
    embed(str(photos), base / "emb", "shapes-tiny")
    r = CliRunner().invoke(main, ["index", str(base / "emb")])
    assert r.exit_code == 0, r.output
    return base


@pytest.fixture(scope="module")
def service(site):
    svc = SearchService(str(site / "emb"), settings=ServeSettings(max_upload_mb=1, batch_wait_ms=2))
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service)) as c:
        yield c


def test_health(client, site):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model"] == "shapes-tiny" and h["n"] == 17 and h["field"] == "image"


def test_text_search_equals_the_index(client, site):
    ix = Index.load(site / "emb")
    want = ix.search_text("a red circle above a blue square", k=5)
    got = client.get("/api/search", params={"q": "a red circle above a blue square", "k": 5}).json()
    assert [h["id"] for h in got["hits"]] == [h.id for h in want]
    assert [h["rank"] for h in got["hits"]] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([h["score"] for h in got["hits"]], [h.score for h in want], atol=1e-5)
    assert got["warnings"] == []
    assert got["hits"][0]["thumb"] == "/thumb/" + want[0].id


def test_image_search_equals_the_index_and_excludes_itself(client, site):
    ix = Index.load(site / "emb")
    path = site / "photos" / "s03.png"
    want = ix.search_image(str(path), k=4)
    got = client.post("/api/search", files={"image": ("q.png", path.read_bytes(), "image/png")},
                      data={"k": "4"}).json()
    assert [h["id"] for h in got["hits"]] == [h.id for h in want]
    assert got["hits"][0]["id"] == "s03.png" and got["hits"][0]["score"] > 0.9999
    got = client.post("/api/search", files={"image": ("q.png", path.read_bytes(), "image/png")},
                      data={"k": "4", "exclude_self": "true"}).json()
    assert "s03.png" not in [h["id"] for h in got["hits"]] and len(got["hits"]) == 4
    assert [h["id"] for h in got["hits"]] == [h.id for h in want[1:]] + [got["hits"][-1]["id"]]


def test_embed_texts_and_image_equal_the_model(client, site):
    model = cliplab.load("shapes-tiny").eval()
    texts = ["a red circle", "two small green triangles"]
    got = client.post("/api/embed", json={"texts": texts}).json()
    assert got["dim"] == 128 and len(got["vectors"]) == 2
    np.testing.assert_allclose(np.array(got["vectors"]), model.encode_texts(texts, normalize=True).numpy(), atol=1e-5)
    img = Image.open(site / "photos" / "s01.png")
    got = client.post("/api/embed", files={"image": ("a.png", png_bytes(img), "image/png")}).json()
    want = model.encode_images([img.convert("RGB")], normalize=True).numpy()
    np.testing.assert_allclose(np.array(got["vectors"]), want, atol=1e-5)


def test_explain_is_clip4dm_on_the_hit(client, site):
    from cliplab.metrics.clip4dm import detect_misalignment

    model = cliplab.load("shapes-tiny").eval()
    q = "a red circle above a blue square"
    got = client.get("/api/explain", params={"q": q, "id": "s02.png"}).json()
    want = detect_misalignment(model, [Image.open(site / "photos" / "s02.png").convert("RGB")], q)[0]
    assert [w["word"] for w in got["words"]] == [w for w, _ in want.words] == q.split()
    np.testing.assert_allclose([w["score"] for w in got["words"]], [s for _, s in want.words], rtol=1e-3, atol=1e-7)
    assert got["cosine"] == pytest.approx(want.cosine, abs=1e-5)
    assert {w["word"] for w in got["words"] if w["misaligned"]} == {w for _, w, _ in want.flagged}
    assert client.get("/api/explain", params={"q": q, "id": "nope.png"}).status_code == 404


def test_thumbnails_only_for_indexed_files_inside_the_root(client, site):
    r = client.get("/thumb/s04.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256
    for bad in ["/thumb/..%2f..%2fetc%2fpasswd", "/thumb/../../etc/passwd", "/thumb//etc/passwd",
                "/thumb/%2Fetc%2Fpasswd", "/thumb/" + str(site / "photos" / "s04.png"), "/thumb/nope.png",
                "/thumb/photos%2Fs04.png", "/thumb/link.png"]:  # the last: indexed, but a symlink out of the root
        r = client.get(bad)
        assert r.status_code == 404, (bad, r.status_code)
        assert set(r.json()) == {"detail"}
    hits = client.get("/api/search", params={"q": "a shape", "k": 17}).json()["hits"]
    assert any(h["id"] == "link.png" for h in hits)  # it is searchable, only its file is not served
    sub = [h for h in hits if h["id"] == "sub/s15.png"]
    assert sub and sub[0]["thumb"] == "/thumb/sub%2Fs15.png"
    assert client.get(sub[0]["thumb"]).status_code == 200


@pytest.mark.parametrize("case", ["too_big", "too_big_chunked", "not_image", "bomb", "over_pixel_limit", "truncated", "empty_query",
                                  "blank_query", "k_zero", "k_huge", "k_text", "no_image_field", "embed_bad_json",
                                  "embed_too_many"])
def test_refusals_are_one_line_with_the_right_status(client, case):
    big = b"\x89PNG" + b"0" * (1024 * 1024 + 10)
    good = png_bytes(Image.new("RGB", (32, 32), "red"))
    requests = {
        "too_big": (lambda: client.post("/api/search", files={"image": ("a.png", big, "image/png")}), 413),
        "too_big_chunked": (lambda: client.post("/api/embed", content=iter([b"{" * 600_000, b"[" * 600_000])), 413),
        "not_image": (lambda: client.post("/api/search", files={"image": ("a.png", b"GIF? no, text", "image/png")}), 415),
        "bomb": (lambda: client.post("/api/search", files={"image": ("b.png", blank_png(12000), "image/png")}), 400),
        "over_pixel_limit": (lambda: client.post("/api/search", files={"image": ("b.png", blank_png(9000), "image/png")}), 400),
        "truncated": (lambda: client.post("/api/search", files={"image": ("t.png", good[:60], "image/png")}), 400),
        "empty_query": (lambda: client.get("/api/search"), 422),
        "blank_query": (lambda: client.get("/api/search", params={"q": "   "}), 422),
        "k_zero": (lambda: client.get("/api/search", params={"q": "x", "k": 0}), 422),
        "k_huge": (lambda: client.get("/api/search", params={"q": "x", "k": 10**6}), 422),
        "k_text": (lambda: client.get("/api/search", params={"q": "x", "k": "ten"}), 422),
        "no_image_field": (lambda: client.post("/api/search", files={"picture": ("a.png", good, "image/png")}), 422),
        "embed_bad_json": (lambda: client.post("/api/embed", content=b"{not json", headers={"content-type": "application/json"}), 422),
        "embed_too_many": (lambda: client.post("/api/embed", json={"texts": ["a"] * 257}), 422),
    }
    send, status = requests[case]
    r = send()
    assert r.status_code == status, (case, r.status_code, r.text[:200])
    body = r.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str) and "\n" not in body["detail"]
    assert body["detail"].strip()


def test_huge_query_is_cut_with_warnings(client):
    r = client.get("/api/search", params={"q": "red circle " * 300, "k": 3})
    assert r.status_code == 200
    notes = r.json()["warnings"]
    assert any("first 1000" in n for n in notes) and any("77-token context" in n for n in notes)
    assert client.get("/api/search", params={"q": "red circle", "k": 3}).json()["warnings"] == []


def test_concurrent_queries_share_one_model_call_with_the_sequential_answers(site):
    svc = SearchService(str(site / "emb"), settings=ServeSettings(batch_wait_ms=300))
    try:
        queries, ks = ["a red circle", "a big blue square above a small green triangle"], [3, 5]
        sequential = [svc.search_text(q, k=k) for q, k in zip(queries, ks)]
        calls = svc.text_batcher.calls
        assert calls == 2
        out = [None, None]
        start = threading.Barrier(2)

        def run(i):
            start.wait()
            out[i] = svc.search_text(queries[i], k=ks[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert svc.text_batcher.calls == calls + 1  # both queries in one model call
        for seq, con, k in zip(sequential, out, ks):
            assert len(con["hits"]) == k
            assert [h["id"] for h in con["hits"]] == [h["id"] for h in seq["hits"]]
            np.testing.assert_allclose([h["score"] for h in con["hits"]], [h["score"] for h in seq["hits"]],
                                       atol=1e-6)
        assert svc.metrics.batches["text"].counts[1] >= 1  # the le=2 bucket saw the batch of two
    finally:
        svc.close()


def test_micro_batcher_limits_errors_and_order():
    seen = []

    def fn(items):
        seen.append(list(items))
        if "boom" in items:
            raise RuntimeError("boom")
        return [x * 2 for x in items]

    b = MicroBatcher(fn, max_batch=3, wait_ms=200)
    try:
        futs = [b.submit(i) for i in range(7)]
        assert [f.result(5) for f in futs] == [0, 2, 4, 6, 8, 10, 12]
        assert [len(s) for s in seen] == [3, 3, 1] and sum(seen, []) == list(range(7))
        bad = [b.submit("boom"), b.submit(1)]
        for f in bad:
            with pytest.raises(RuntimeError, match="boom"):
                f.result(5)
        assert b(5, timeout=5) == 10  # the worker survived the failed batch
    finally:
        b.close()
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(fn, max_batch=0)


def test_metrics_count_requests_and_are_prometheus_text(client):
    before = client.get("/metrics").text

    def count(text, status):
        m = re.search(r'cliplab_requests_total\{route="/api/search",method="GET",status="%d"\} (\d+)' % status, text)
        return int(m.group(1)) if m else 0

    client.get("/api/search", params={"q": "a circle", "k": 2})
    client.get("/api/search", params={"q": "", "k": 2})
    after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    assert count(after.text, 200) == count(before, 200) + 1 and count(after.text, 422) == count(before, 422) + 1
    line = re.compile(r'^(# (HELP|TYPE) .*|[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? [0-9.e+-]+)$')
    assert all(line.match(x) for x in after.text.strip().splitlines())
    buckets = [int(v) for v in re.findall(r'cliplab_request_duration_seconds_bucket\{route="/api/search",le="[^"]+"\} (\d+)',
                                          after.text)]
    assert buckets == sorted(buckets) and buckets[-1] >= 2


def test_page_and_docs_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="q"' in page.text and "/static/app.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works offline
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "/api/explain" in js.text
    assert client.get("/static/../service.py").status_code == 404
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/search", "/api/embed", "/api/explain", "/health", "/metrics"} <= set(paths)


def test_cli_refuses_a_busy_port_and_warns_on_all_interfaces(site):
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket() as s:
            s.bind((host, 0))
            s.listen()
            port = s.getsockname()[1]
            r = CliRunner().invoke(main, ["serve", str(site / "emb"), "--host", host, "--port", str(port)])
        assert r.exit_code == 1 and f"cannot listen on {host}:{port}" in r.stderr
        assert ("no authentication" in r.stderr) == (host == "0.0.0.0")
    r = CliRunner().invoke(main, ["serve", str(site / "photos"), "--port", "0"])
    assert r.exit_code == 2 and "holds no index" in r.stderr


def test_settings_are_checked():
    with pytest.raises(ValueError, match="precision"):
        ServeSettings(precision="int4")
    with pytest.raises(ValueError, match="k_max"):
        ServeSettings(k_max=0)


@pytest.mark.filterwarnings("ignore::cliplab.models.hardware.PerformanceWarning")
def test_bf16_service_answers_close_to_fp32(site, service):
    svc = SearchService(str(site / "emb"), settings=ServeSettings(precision="bf16"))
    try:
        assert svc.health()["precision"] == "bf16" and service.health()["precision"] == "fp32"
        q = "a red circle above a blue square"
        fast, exact = svc.search_text(q, k=16)["hits"], service.search_text(q, k=16)["hits"]
        by_id = {h["id"]: h["score"] for h in exact}
        assert max(abs(h["score"] - by_id[h["id"]]) for h in fast) < 0.03  # the same ranking up to bf16 noise
    finally:
        svc.close()


def test_a_request_waiting_too_long_for_the_model_gets_504(site):
    svc = SearchService(str(site / "emb"), settings=ServeSettings(timeout_s=0.2))
    real = svc.text_batcher.fn
    svc.text_batcher.fn = lambda items: (time.sleep(1.0), real(items))[1]  # an overloaded model
    try:
        with TestClient(create_app(svc)) as c:
            r = c.get("/api/search", params={"q": "a red circle"})
            assert r.status_code == 504 and "did not answer within 0.2 s" in r.json()["detail"]
            svc.text_batcher.fn = real
            time.sleep(1.0)  # the worker finishes the slow batch it had started
            assert c.get("/api/search", params={"q": "a red circle"}).status_code == 200  # and it recovers
    finally:
        svc.close()


def test_image_to_text_over_a_caption_index(tmp_path):
    import csv

    from cliplab.data.synthetic.captions import short_caption

    world = cliplab.data.SceneWorld(image_size=64, seed=1)
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        table = csv.writer(f)
        table.writerow(["path", "caption"])
        for i in range(8):
            scene = world.sample(i)
            scene.render().save(tmp_path / f"p{i}.png")
            table.writerow([f"p{i}.png", short_caption(scene)])
    embed(str(tmp_path / "pairs.csv"), tmp_path / "emb", "shapes-tiny")
    r = CliRunner().invoke(main, ["index", str(tmp_path / "emb"), "--field", "text"])
    assert r.exit_code == 0, r.output
    svc = SearchService(str(tmp_path / "emb"))
    try:
        with TestClient(create_app(svc)) as c:
            assert c.get("/health").json()["field"] == "text"
            got = c.post("/api/search", files={"image": ("q.png", (tmp_path / "p3.png").read_bytes(), "image/png")},
                         data={"k": "8"}).json()["hits"]
            want = Index.load(tmp_path / "emb").search_image(str(tmp_path / "p3.png"), k=8)
            assert [h["caption"] for h in got] == [h.caption for h in want] and all(h["caption"] for h in got)
            # a caption's explanation is computed against the image its row names (encoded from the file)
            ex = c.get("/api/explain", params={"q": "a red circle", "id": got[0]["id"]}).json()
            assert [w["word"] for w in ex["words"]] == ["a", "red", "circle"]
    finally:
        svc.close()


def test_a_timed_out_item_is_withdrawn_before_the_model_sees_it():
    seen, gate = [], threading.Event()

    def fn(items):
        gate.wait(5)
        seen.extend(items)
        return items

    b = MicroBatcher(fn, max_batch=1, wait_ms=0)
    try:
        first = b.submit("first")  # occupies the worker until the gate opens
        time.sleep(0.05)
        with pytest.raises(TimeoutError):
            b("late", timeout=0.1)
        gate.set()
        assert first.result(5) == "first" and b("next", timeout=5) == "next"
        assert seen == ["first", "next"]
    finally:
        b.close()


def test_a_long_query_is_cut_to_fit_so_the_encoder_never_truncates(service):
    import warnings as w

    text, notes = service.prepare_query("red circle " * 60)
    assert any("77-token context" in n for n in notes)
    with w.catch_warnings():
        w.simplefilter("error")  # a second truncation would warn (and fail here)
        batch = service.model.tokenize([text])
    assert not batch.num_truncated and int(batch.lengths[0]) == 77
    assert service.prepare_query("red circle") == ("red circle", [])


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory):
    """One ONNX export cache for the backend tests of this module (the export is the slow part)."""
    import os

    before = os.environ.get("CLIPLAB_CACHE")
    os.environ["CLIPLAB_CACHE"] = str(tmp_path_factory.mktemp("export-cache"))
    yield
    if before is None:
        os.environ.pop("CLIPLAB_CACHE", None)
    else:
        os.environ["CLIPLAB_CACHE"] = before


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_service_on_another_backend_answers_as_torch(site, service, backend, export_cache):
    """``--backend`` on serve: text search answers as the torch service does (fp32 fidelity), health says what
    runs, and explanations (which take gradients) are refused with a one-line 400."""
    pytest.importorskip("openvino" if backend == "openvino" else "onnxruntime")
    svc = SearchService(str(site / "emb"), settings=ServeSettings(backend=backend))
    try:
        assert svc.health()["backend"] == backend and service.health()["backend"] == "torch"
        q = "a red circle above a blue square"
        got, want = svc.search_text(q, k=8)["hits"], service.search_text(q, k=8)["hits"]
        assert [h["id"] for h in got] == [h["id"] for h in want]
        np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in want], atol=1e-4)
        with TestClient(create_app(svc)) as c:
            r = c.get("/api/explain", params={"q": q, "id": want[0]["id"]})
            assert r.status_code == 400 and "--backend torch" in r.json()["detail"]
    finally:
        svc.close()
    with pytest.raises(ValueError, match="openvino"):  # a pair no backend offers: the error names who does
        ServeSettings(backend="onnxruntime", precision="bf16")
