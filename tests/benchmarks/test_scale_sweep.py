"""The resumable sweep runner: stable job names, and a rerun that finds every run done
launches nothing and pools the kept runs per setting."""

import json

import pytest

from benchmarks.scale_sweep import job_name, main


def test_job_names_are_stable_and_tell_every_axis_apart():
    a = job_name("baseline", {"lr": "1e-2"}, "sks", "0")
    assert a == job_name("baseline", {"lr": "1e-2"}, "sks", "0", "dev") and a.startswith("sks-")
    others = [job_name("s2_k2", {"lr": "1e-2"}, "sks", "0"), job_name("baseline", {"lr": "3e-2"}, "sks", "0"),
              job_name("baseline", {"lr": "1e-2"}, "zwx", "0"), job_name("baseline", {"lr": "1e-2"}, "sks", "1"),
              job_name("baseline", {"lr": "1e-2"}, "sks", "0", "test")]
    assert len({a, *others}) == 6


def test_a_sweep_whose_runs_are_kept_only_pools_them(tmp_path, monkeypatch):
    def run(subject, seed, recognised):
        per_image = {"subject_recognised": [recognised] * 4, "prompt_fidelity": [1.0] * 4,
                     "instance_prompt_recognised": [1.0] * 2, "preservation": [0.5] * 4}
        return {"row": "fp", "subject": subject, "seed": seed, "subject_recognised": recognised,
                "prompt_fidelity": 1.0, "preservation": 0.5, "per_image": per_image}

    runs = tmp_path / "work" / "runs"
    runs.mkdir(parents=True)
    for lr, value in (("1e-2", 1.0), ("3e-2", 0.0)):
        for subject in ("sks", "zwx"):
            name = job_name("fp", {"lr": lr}, subject, "0", "test")
            (runs / name).write_text(json.dumps({"runs": [run(subject, 0, value)]}))
    monkeypatch.setattr("subprocess.Popen", lambda *a, **k: pytest.fail("a kept run was launched again"))
    out = tmp_path / "sweep.json"
    main(["--rows", "fp", "--grid", "lr=1e-2,3e-2", "--subjects", "sks,zwx", "--split", "test",
          "--work", str(tmp_path / "work"), "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["split"] == "test" and [r["setting"] for r in report["results"]] == [{"lr": "1e-2"}, {"lr": "3e-2"}]
    first, second = (r["table"]["fp"] for r in report["results"])
    assert first["subject_recognised"]["mean"] == 1.0 and second["subject_recognised"]["mean"] == 0.0
    assert first["subject_recognised"]["n"] == 8 and first["preservation"]["mean"] == 0.5
    assert [r["subject"] for r in report["results"][0]["runs"]] == ["sks", "zwx"]


def test_collect_keeps_every_report_as_written(tmp_path):
    reports = [{"command": f"sweep {i}", "split": "dev", "results": [{"setting": {"lr": str(i)}}]} for i in range(2)]
    paths = []
    for i, report in enumerate(reports):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(report))
    main(["--collect", *map(str, paths), "--out", str(tmp_path / "all.json")])
    assert json.loads((tmp_path / "all.json").read_text()) == {"sweeps": reports}
    # a collection collected again with a new report: its sweeps, then the new one, flat
    (tmp_path / "new.json").write_text(json.dumps(reports[0]))
    main(["--collect", str(tmp_path / "all.json"), str(tmp_path / "new.json"), "--out", str(tmp_path / "more.json")])
    assert json.loads((tmp_path / "more.json").read_text()) == {"sweeps": [*reports, reports[0]]}
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x.json")])  # neither a sweep nor a collection


def test_kept_only_reports_what_is_there_and_counts_the_rest(tmp_path, monkeypatch):
    runs = tmp_path / "work" / "runs"
    runs.mkdir(parents=True)
    per_image = {"subject_recognised": [1.0, 0.0], "prompt_fidelity": [1.0, 1.0]}
    (runs / job_name("fp", {"lr": "1e-2"}, "sks", "0", "test")).write_text(json.dumps(
        {"runs": [{"row": "fp", "subject": "sks", "seed": 0, "subject_recognised": 0.5, "prompt_fidelity": 1.0,
                   "preservation": 1.0, "per_image": per_image}]}))
    monkeypatch.setattr("subprocess.Popen", lambda *a, **k: pytest.fail("--kept-only launched a run"))
    out = tmp_path / "partial.json"
    main(["--rows", "fp", "--grid", "lr=1e-2", "--subjects", "sks,zwx", "--seeds", "0,1", "--split", "test",
          "--work", str(tmp_path / "work"), "--out", str(out), "--kept-only"])
    report = json.loads(out.read_text())
    assert report["missing_runs"] == 3
    assert report["results"][0]["table"]["fp"]["subject_recognised"]["mean"] == 0.5


def test_reuse_files_a_published_reports_runs_so_only_the_new_seed_runs(tmp_path, monkeypatch):
    per_image = {"subject_recognised": [1.0, 0.0], "prompt_fidelity": [1.0, 1.0]}

    def run(subject, seed):
        return {"row": "fp", "subject": subject, "seed": seed, "subject_recognised": 0.5, "prompt_fidelity": 1.0,
                "preservation": 1.0, "per_image": per_image}

    published = {"rows": ["fp"], "split": "test",
                 "results": [{"setting": {"lr": "1e-2"}, "runs": [run(s, seed) for seed in (0, 1) for s in ("sks", "zwx")]}]}
    (tmp_path / "published.json").write_text(json.dumps({"sweeps": [published]}))
    monkeypatch.setattr("subprocess.Popen", lambda *a, **k: pytest.fail("--kept-only launched a run"))
    out = tmp_path / "r.json"
    main(["--rows", "fp", "--grid", "lr=1e-2", "--subjects", "sks,zwx", "--seeds", "0,1,2", "--split", "test",
          "--work", str(tmp_path / "work"), "--reuse", str(tmp_path / "published.json"), "--out", str(out), "--kept-only"])
    report = json.loads(out.read_text())
    assert len(list((tmp_path / "work" / "runs").iterdir())) == 4 and report["missing_runs"] == 2
    assert report["results"][0]["table"]["fp"]["subject_recognised"]["n"] == 8
    # the same report reused again writes nothing new; a report without runs is refused
    from benchmarks.scale_sweep import reuse
    assert reuse([tmp_path / "published.json"], tmp_path / "work" / "runs") == 0
    (tmp_path / "bare.json").write_text(json.dumps({**published, "results": [{"setting": {"lr": "1e-2"}}]}))
    with pytest.raises(SystemExit, match="without its runs"):
        reuse([tmp_path / "bare.json"], tmp_path / "work" / "runs")


def test_paired_difference_pairs_runs_by_subject_and_seed(tmp_path):
    def run(row, subject, seed, recognised):
        return {"row": row, "subject": subject, "seed": seed,
                "per_image": {"subject_recognised": recognised, "prompt_fidelity": [1.0] * len(recognised)}}

    # A beats B by exactly 0.5 on every shared run; B's extra run (zwx seed 1) has no partner
    a = {"rows": ["a"], "split": "test", "results": [{"setting": {}, "runs": [
        run("a", "sks", 0, [1.0, 1.0]), run("a", "zwx", 0, [1.0, 0.0])]}]}
    b = {"rows": ["b"], "split": "test", "results": [{"setting": {}, "runs": [
        run("b", "sks", 0, [0.5, 0.5]), run("b", "zwx", 0, [0.0, 0.0]), run("b", "zwx", 1, [1.0, 1.0])]}]}
    for name, report in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
    out = tmp_path / "paired.json"
    main(["--paired", "a", "b", "--collect", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["runs"] == [["sks", 0], ["zwx", 0]]
    recognised = result["difference"]["subject_recognised"]
    assert recognised["mean"] == 0.5 and recognised["pairs"] == 2 and recognised["low"] <= 0.5 <= recognised["high"]
    assert result["difference"]["prompt_fidelity"] == {"mean": 0.0, "low": 0.0, "high": 0.0, "pairs": 2}
    with pytest.raises(SystemExit, match="share no"):
        main(["--paired", "a", "c", "--collect", str(tmp_path / "a.json"), "--out", str(out)])
    # the same run reported twice pairs once; two different runs of one (subject, seed) are refused
    main(["--paired", "a", "b", "--collect", str(tmp_path / "a.json"), str(tmp_path / "a.json"), str(tmp_path / "b.json"),
          "--out", str(out)])
    assert json.loads(out.read_text())["difference"]["subject_recognised"]["mean"] == 0.5
    other = {**a, "results": [{"setting": {"lr": "2"}, "runs": [run("a", "sks", 0, [0.0, 0.0])]}]}
    (tmp_path / "a2.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="row a has two different runs of sks seed 0"):
        main(["--paired", "a", "b", "--collect", str(tmp_path / "a.json"), str(tmp_path / "a2.json"),
              str(tmp_path / "b.json"), "--out", str(out)])
