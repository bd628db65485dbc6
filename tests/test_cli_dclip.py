"""`cliplab dclip distill`: DCLIP from the command line with tiny settings; its options reach the library."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

import cliplab
from cliplab.cli import main


def test_dclip_distill_saves_a_student_and_reports_before_and_after(tmp_path, monkeypatch):
    from cliplab.objectives import dclip as D

    seen = {}
    real_distill, real_teacher = D.distill, D.train_teacher

    def spy_distill(student, scenes, captions, targets, **kw):
        seen["distill"] = dict(kw, targets=targets is not None, scenes=len(scenes))
        return real_distill(student, scenes, captions, targets, **kw)

    def spy_teacher(teacher, features, **kw):
        seen["teacher"] = kw
        return real_teacher(teacher, features, **kw)

    monkeypatch.setattr(D, "distill", spy_distill)
    monkeypatch.setattr(D, "train_teacher", spy_teacher)
    r = CliRunner().invoke(main, ["dclip", "distill", "--train-groups", "2", "--test-groups", "2", "--teacher-steps",
                                  "2", "--steps", "1", "--lr", "1e-5", "--alpha", "0.3", "--seed", "2",
                                  "-o", str(tmp_path / "student"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert seen["distill"] == {"steps": 1, "batch_size": 32, "lr": 1e-5, "alpha": 0.3, "group_size": 4, "seed": 2,
                               "targets": True, "scenes": 8}
    assert seen["teacher"]["steps"] == 2 and seen["teacher"]["seed"] == 2
    assert set(d["before"]) == set(d["after"]) == {"group_r1", "zeroshot"}
    student, base = cliplab.load(str(tmp_path / "student")), cliplab.load("shapes-tiny")
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), base.state_dict().values()))
    seen.clear()
    r = CliRunner().invoke(main, ["dclip", "distill", "--train-groups", "2", "--test-groups", "1", "--steps", "1",
                                  "--alpha", "1", "-o", str(tmp_path / "control")])
    assert r.exit_code == 0, r.output
    assert "teacher" not in seen and seen["distill"]["targets"] is False  # the control trains no teacher
