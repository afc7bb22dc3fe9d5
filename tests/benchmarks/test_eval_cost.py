"""benchmarks/eval_cost.py on a short run on the tiny Llama's cache: both shortcuts measured and equal."""

from __future__ import annotations

from benchmarks import eval_cost


def test_both_shortcuts_give_the_same_figures_and_the_certificate_saves_decodes(cache_run):
    (row,) = eval_cost.main([str(cache_run), "--contexts", "4"])
    for search in row["dl_search"]:
        assert search["same"], search
        every, certified = search["decodes"]
        assert certified < every
    down = row["downstream"]
    assert down is not None and down["same"] and down["contexts"] == 4
    assert set(down["seconds"]) == {"full passes", "site pass + replayed"}
