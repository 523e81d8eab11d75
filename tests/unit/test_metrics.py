import pytest

from peftlab.evaluate.metrics import classification_metrics, wilson_interval


def test_wilson_interval_matches_the_textbook_value():
    low, high = wilson_interval(1800, 2000)  # 90% of 2000: about +-1.3 points
    assert low == pytest.approx(0.88608, abs=1e-5) and high == pytest.approx(0.91239, abs=1e-5)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_per_class_and_confusion():
    m = classification_metrics([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], ["neg", "pos"])
    assert m["accuracy"] == pytest.approx(0.6) and m["n"] == 5
    assert m["confusion"]["matrix"] == [[1, 1], [1, 2]]
    assert m["per_class"]["pos"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["neg"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["pos"]["f1"] == pytest.approx(2 / 3)
