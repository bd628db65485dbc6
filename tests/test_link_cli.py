"""``cliplab link``: a CSV of image paths + OCR texts in, the same cluster ids as the Python API out."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

import cliplab
from cliplab.apps.clippings import link_records
from cliplab.apps.records import make_records
from cliplab.cli import main


@pytest.fixture(scope="module")
def records_csv(tmp_path_factory):
    folder = tmp_path_factory.mktemp("records")
    rec = make_records(4, 2, seed=7)
    with open(folder / "records.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "ocr", "note"])
        for i, (im, t) in enumerate(zip(rec.images, rec.texts)):
            im.save(folder / f"{i}.png")
            w.writerow([f"{i}.png", t, f"n{i}"])
    return folder / "records.csv", rec


def test_link_json_matches_api_and_out_keeps_columns(records_csv, tmp_path):
    path, rec = records_csv
    out = tmp_path / "linked.csv"
    r = CliRunner().invoke(main, ["link", str(path), "--image-col", "path", "--text-col", "ocr", "--threshold", "0.3",
                                  "--image-weight", "0.4", "--method", "single", "-m", "shapes-tiny", "-o", str(out),
                                  "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    want = link_records(cliplab.load("shapes-tiny"), rec.images, rec.texts, threshold=0.3, image_weight=0.4,
                        method="single")
    assert [x["cluster"] for x in data["records"]] == want.tolist()
    assert (data["threshold"], data["image_weight"], data["method"]) == (0.3, 0.4, "single")
    rows = list(csv.DictReader(open(out)))
    assert [int(x["cluster"]) for x in rows] == want.tolist() and rows[0]["note"] == "n0"


def test_link_threshold_zero_and_two_give_singletons_and_one_cluster(records_csv):
    path, rec = records_csv
    runs = {t: json.loads(CliRunner().invoke(main, ["link", str(path), "--image-col", "path", "--text-col", "ocr",
                                                    "--threshold", t, "--json"]).output) for t in ("0", "2")}
    assert runs["0"]["n_clusters"] == len(rec) and runs["2"]["n_clusters"] == 1


def test_link_missing_column_is_a_clear_error(records_csv):
    path, _ = records_csv
    r = CliRunner().invoke(main, ["link", str(path), "--json"])
    assert r.exit_code == 2 and "no column 'image'" in r.output
