"""The memory calculator: its report function and every slider at its limits."""

import pytest

from reformer_lab.widgets.memory import DTYPES, attention_memory_report, memory_calculator


def test_report_of_64k_float32():
    report = attention_memory_report(65536)
    assert "17,179,869,184 B (16.0 GiB)" in report
    assert " 16 GiB GPU: scores fit; longest L = 65,536" in report
    assert " 80 GiB GPU: scores fit; longest L = 146,542" in report


def test_report_says_when_scores_do_not_fit():
    report = attention_memory_report(2**20)
    assert report.count("scores do not fit") == 3


def test_report_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="dtype must be one of"):
        attention_memory_report(1024, dtype="int8")


def test_calculator_callback_at_min_default_max(capsys):
    explorer = memory_calculator()
    sliders = [child for child in explorer.children if hasattr(child, "min")]
    dropdown = next(child for child in explorer.children if hasattr(child, "options"))
    for setting in ("min", "value", "max"):
        values = {slider.description: getattr(slider, setting) for slider in sliders}
        for dtype in DTYPES:
            explorer.f(values["log2 L"], values["batch"], values["heads"], dtype)
            assert "longest L" in capsys.readouterr().out
    assert dropdown.value == "float32"
