"""`cliplab serve` as a user runs it: a subprocess on a free port, the page driven in headless Chromium (type, see
thumbnails, click for the attribution, search by image, phone width, keyboard only), and a bounded load test with a
misbehaving client in parallel (zero 5xx, zero lost responses)."""

from __future__ import annotations

import csv
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from click.testing import CliRunner

import cliplab.data
from cliplab.data.synthetic.captions import short_caption
from cliplab.cli import main
from cliplab.pipeline import embed

pytest.importorskip("fastapi", reason="cliplab serve needs FastAPI: pip install 'cliplab[serve]'")
pytest.importorskip("uvicorn", reason="cliplab serve needs uvicorn: pip install 'cliplab[serve]'")

SCREENSHOTS = os.environ.get("CLIPLAB_SCREENSHOTS")  # a folder: save the page's screenshots there (docs/img)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`cliplab serve` over 24 scenes with captions, in a subprocess; yields its base URL."""
    base = tmp_path_factory.mktemp("serve-e2e")
    world = cliplab.data.SceneWorld(image_size=96, seed=0)
    photos = base / "photos"
    photos.mkdir()
    with open(base / "pairs.csv", "w", newline="") as f:
        table = csv.writer(f)
        table.writerow(["path", "caption"])
        for i in range(24):
            scene = world.sample(i)
            scene.render().save(photos / f"scene{i:02d}.png")
            table.writerow([f"photos/scene{i:02d}.png", short_caption(scene)])
    embed(str(base / "pairs.csv"), base / "emb", "shapes-tiny")
    r = CliRunner().invoke(main, ["index", str(base / "emb"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["n"] == 24, r.output
    log = open(base / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cliplab", "serve", str(base / "emb"), "--port", "0", "--json",
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=log)
    started = {}
    reader = threading.Thread(target=lambda: started.update(json.loads(proc.stdout.readline() or b"{}")))
    reader.start()
    reader.join(120)
    if not started:
        proc.kill()
        pytest.fail("cliplab serve did not start:\n" + (base / "server.log").read_text())
    port, url = started["port"], started["url"].rstrip("/")
    assert started["n"] == 24 and started["model"] == "shapes-tiny" and url == f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:  # --json speaks once the model is loaded; the socket opens a moment later
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("cliplab serve did not come up:\n" + (base / "server.log").read_text())
        time.sleep(0.2)
    yield {"url": url, "port": port, "base": base, "proc": proc}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def get_json(port: int, path: str):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, json.loads(r.read())


# --- the page in a real browser -------------------------------------------------------------------------------------

def chromium_paths():
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    binary, driver = chromium_paths()
    if not binary or not driver:
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        opts.add_argument(arg)
    from selenium.webdriver.chrome.service import Service

    drv = webdriver.Chrome(service=Service(driver), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def wait_for(drv, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout, poll_frequency=0.1).until(condition)


def shot(drv, name):
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        from PIL import Image

        path = Path(SCREENSHOTS) / name
        drv.save_screenshot(str(path))
        Image.open(path).convert("RGB").quantize(colors=128).save(path, optimize=True)  # docs stay small


def loaded_thumbnails(drv) -> int:
    return drv.execute_script(
        "return [...document.querySelectorAll('#results img')].filter(i => i.complete && i.naturalWidth > 0).length")


def test_search_page_types_a_query_shows_thumbnails_and_explains_a_hit(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    drv = browser
    drv.get(server["url"] + "/")
    wait_for(drv, lambda d: "scene" not in d.find_element(By.ID, "status").text and
             "images" in d.find_element(By.ID, "status").text)
    box = drv.find_element(By.ID, "q")
    assert drv.switch_to.active_element == box  # the search box has the focus on arrival
    query = "two blue circles"
    box.send_keys(query, Keys.ENTER)
    wait_for(drv, lambda d: loaded_thumbnails(d) >= 12)
    hits = drv.find_elements(By.CSS_SELECTOR, "#results button.hit")
    want = get_json(server["port"], f"/api/search?q={quote(query)}&k=24")[1]["hits"]
    assert [h.get_attribute("data-id") for h in hits] == [h["id"] for h in want]
    assert "results for" in drv.find_element(By.ID, "message").text
    shot(drv, "serve_results.png")
    hits[0].click()
    wait_for(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#explain-words .w")) > 0)
    words = [w.text for w in drv.find_elements(By.CSS_SELECTOR, "#explain-words .w")]
    assert words == query.split()
    explained = get_json(server["port"], f"/api/explain?q={quote(query)}&id={quote(want[0]['id'])}")[1]
    classes = [w.get_attribute("class") for w in drv.find_elements(By.CSS_SELECTOR, "#explain-words .w")]
    assert [("neg" in c) for c in classes] == [w["score"] < 0 for w in explained["words"]]
    assert hits[0].get_attribute("aria-pressed") == "true"
    shot(drv, "serve_explain.png")
    drv.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    wait_for(drv, lambda d: not d.find_element(By.ID, "explain").is_displayed())


def test_search_page_by_image_upload_keyboard_and_phone_width(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    drv = browser
    drv.get(server["url"] + "/?q=" + quote("a small green triangle"))  # a shared link runs its query
    wait_for(drv, lambda d: loaded_thumbnails(d) >= 12)
    # keyboard only: Tab from the search box reaches the results; Enter on one explains it
    drv.find_element(By.ID, "q").click()
    active = drv.switch_to.active_element
    for _ in range(12):
        active.send_keys(Keys.TAB)
        active = drv.switch_to.active_element
        if "hit" in (active.get_attribute("class") or ""):
            break
    assert "hit" in active.get_attribute("class")
    active.send_keys(Keys.ENTER)
    wait_for(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#explain-words .w")) == 4)
    # search by image: the picked file is the query; with "leave out the image itself" it is not the first hit
    photo = server["base"] / "photos" / "scene05.png"
    drv.find_element(By.ID, "exclude-self").click()
    drv.find_element(By.ID, "file").send_keys(str(photo))
    wait_for(drv, lambda d: "the image" in d.find_element(By.ID, "message").text and loaded_thumbnails(d) >= 12)
    first = drv.find_elements(By.CSS_SELECTOR, "#results button.hit")[0].get_attribute("data-id")
    own = [h for h in get_json(server["port"], "/api/search?q=x&k=24")[1]["hits"] if h["path"].endswith("scene05.png")]
    assert len(own) == 1 and first != own[0]["id"]  # without the box ticked it would be first, at score 1
    # phone width: no horizontal scrolling, two columns of results
    drv.set_window_size(390, 844)
    time.sleep(0.3)
    assert drv.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    cols = drv.execute_script("return getComputedStyle(document.getElementById('results'))"
                              ".gridTemplateColumns.split(' ').length")
    assert cols == 2
    drv.get(server["url"] + "/?q=" + quote("orange dotted circles"))
    wait_for(drv, lambda d: loaded_thumbnails(d) >= 8)
    shot(drv, "serve_phone.png")
    drv.set_window_size(1280, 900)


# --- load, with a misbehaving client ---------------------------------------------------------------------------------

GARBAGE = [
    b"\x00\xff\x13garbage\r\n\r\n",
    b"GET /api/search?q=%ff%fe%00&k=3 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /thumb/..%2f..%2f..%2fetc%2fpasswd HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
    b"Content-Length: 40\r\n\r\n--zz\r\nnot a proper part at all\r\n",
    b"POST /api/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n{\"texts\":",
    b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n\r\nxx",
    b"GET /api/search?q=" + b"A" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"y" * 70000 + b"\r\n\r\n",
    b"GET /api/explain?q=red&id=%00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /api/search?q=red HTTP/1.1\r\n",  # never finished
]


def misbehave(port: int, stop: threading.Event, seen: list):
    rng = random.Random(0)
    while not stop.is_set():
        payload = rng.choice(GARBAGE)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR) if rng.random() < 0.5 else None
                data = s.recv(200)
            if data.startswith(b"HTTP/1.1 "):
                seen.append(int(data[9:12]))
        except OSError:
            pass  # the server may close or time out a garbage connection: that is its right


def test_load_2000_requests_16_clients_zero_5xx_zero_lost(server):
    port = server["port"]
    words = ["red", "blue", "green", "yellow", "circle", "square", "triangle", "star", "small", "big", "above",
             "left of", "a", "two"]
    n_clients, per_client = 16, 125
    statuses: list[list[int]] = [[] for _ in range(n_clients)]
    failures: list[str] = []
    stop, garbage = threading.Event(), []
    bad = threading.Thread(target=misbehave, args=(port, stop, garbage))

    def client(c):
        rng = random.Random(c)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(per_client):
            q = quote(" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))))
            try:
                conn.request("GET", f"/api/search?q={q}&k={rng.randint(1, 20)}")
                r = conn.getresponse()
                body = json.loads(r.read())
                statuses[c].append(r.status)
                if r.status == 200 and not body["hits"]:
                    failures.append("empty hits")
            except Exception as exc:  # a lost response
                failures.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.close()

    bad.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    seconds = time.perf_counter() - t0
    stop.set()
    bad.join()
    flat = [s for row in statuses for s in row]
    assert not failures, failures[:5]
    assert len(flat) == n_clients * per_client and set(flat) == {200}
    assert garbage and all(400 <= s < 500 or s == 200 for s in garbage), sorted(set(garbage))
    status, _ = get_json(port, "/health")
    assert status == 200 and server["proc"].poll() is None
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    metrics = conn.getresponse().read().decode()
    assert "cliplab_request_errors_total{" not in metrics  # no route ever answered 5xx
    batches = [line for line in metrics.splitlines() if line.startswith('cliplab_batch_size_count{kind="text"}')]
    print(f"\n{len(flat)} requests from {n_clients} clients in {seconds:.1f} s ({len(flat) / seconds:.0f} QPS); "
          f"garbage answered: {len(garbage)}; {batches}")
