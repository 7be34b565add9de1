from qpdeploy.progress import stage


def test_off_a_terminal_long_stages_print_periodic_one_line_records(monkeypatch, capsys):
    monkeypatch.setenv("QPDEPLOY_PROGRESS_SECONDS", "0")
    with stage("train", 3, "lines") as advance:
        for loss in (0.5, 0.25, 0.125):
            advance(loss=loss)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4  # one per step with a zero interval, and the closing record
    assert lines[0].startswith("[train] 1/3 ") and " eta " in lines[0] and lines[0].endswith("loss 0.5")
    assert lines[-1].startswith("[train] 3/3 ") and lines[-1].endswith("loss 0.125")


def test_short_stages_print_nothing(monkeypatch, capsys):
    monkeypatch.setenv("QPDEPLOY_PROGRESS_SECONDS", "30")
    with stage("export", 2, "lines") as advance:
        advance()
        advance()
    with stage("export", 2, False) as advance:
        advance()
    assert capsys.readouterr().err == ""
