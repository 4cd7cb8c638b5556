"""The text-comparison helpers of the extraction benchmark (bench/extraction.py).

Run: `.venv/bin/python -m pytest tests/unit/test_bench_data.py -q` (well under a second).
"""

import pytest

from bench.extraction import clean_lines, line_precision, prose_recall, prose_share, word_overlap

WET = "Menu\nHome\nThe river floods every spring. Farmers plant after the water goes down.\nContact us\n"


def test_word_overlap_is_a_bag_of_words_share_each_way():
    ov = word_overlap("The river floods every spring.", WET)
    assert ov["precision"] == 1.0  # every word of ours is on the page
    assert ov["recall"] == pytest.approx(5 / 16)  # 5 of the page's 16 words
    assert ov["f1"] == pytest.approx(2 * ov["recall"] / (1 + ov["recall"]))


def test_word_overlap_counts_repeats_only_as_often_as_the_reference_has_them():
    ov = word_overlap("spam spam spam eggs", "spam eggs")
    assert (ov["shared"], ov["ours"], ov["reference"]) == (2, 4, 2)
    assert ov["precision"] == 0.5 and ov["recall"] == 1.0


def test_word_overlap_is_case_blind_and_unicode_aware_and_safe_on_empty_text():
    assert word_overlap("Größe ÉTÉ", "größe été")["f1"] == 1.0
    assert word_overlap("", "text") == {"shared": 0, "ours": 0, "reference": 1, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert word_overlap(None, "")["f1"] == 0.0


def test_lines_ignore_trafilatura_table_bars_and_list_dashes():
    assert clean_lines("Superficie | 19,01 km² |\n---|---|\n- Ilesia  parroquial\n\n") == [
        "Superficie 19,01 km²",
        "Ilesia parroquial",
    ]
    assert line_precision("Superficie | 19,01 km² |\n- made up line", "Superficie\n19,01 km²\nother") == 0.5


def test_prose_recall_counts_the_reference_sentences_found_in_ours():
    assert prose_recall("The river floods every spring. Farmers plant after the water goes down.", WET) == 1.0
    assert prose_recall("Menu Home Contact us", WET) == 0.0
    assert prose_recall("anything", "Menu\nHome") == 0.0  # no prose in the reference


def test_prose_share_weighs_lines_by_words():
    assert prose_share("One two three four.\nMenu item") == pytest.approx(4 / 6)
    assert prose_share("") == 0.0
