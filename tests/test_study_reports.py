"""Pieces of the study reports on hand-made data: the ADM report's AT-vs-others counts, the versions section."""
from scripts.adm_study_report import versus_table

CLF = "fmnist-classifier"


def cell(mean, std):
    return {"mean": mean, "std": std, "n_seeds": 3 if std is not None else 1, "num": 10000}


def test_versus_counts_cells_beyond_the_seed_spread_per_sampler():
    agg = {(CLF, "at", "ddim", 5): cell(10.0, 0.3), (CLF, "base", "ddim", 5): cell(11.0, 0.1),   # 1.0 > 2*0.32: lower
           (CLF, "at", "ddim", 10): cell(8.0, 0.3), (CLF, "base", "ddim", 10): cell(8.5, 0.3),   # 0.5 < 0.85: within
           (CLF, "at", "ddim", 20): cell(9.0, 0.1), (CLF, "base", "ddim", 20): cell(7.0, 0.1),   # higher
           (CLF, "at", "iddpm", 5): cell(5.0, None), (CLF, "base", "iddpm", 5): cell(9.0, None)}  # one seed: skipped
    lines = versus_table(agg, CLF, models=("at",))
    row = next(line for line in lines if line.startswith("| ADM-AT (full) | ADM (base) |"))
    assert row.split(" | ")[2:4] == ["1/1/1", "–"]   # DDIM counted; DPM-Solver has no cells
    assert row.rstrip(" |").endswith("–")             # IDDPM's only cell has one seed
    assert not any("ADM-FT" in line for line in lines)   # no cells for FT: no row


def test_versus_says_what_it_needs_when_no_cell_has_seeds():
    agg = {(CLF, "at", "ddim", 5): cell(10.0, None), (CLF, "base", "ddim", 5): cell(11.0, None)}
    assert versus_table(agg, CLF) == ["(needs two or more sampling seeds per cell)"]


def test_versus_compares_the_two_at_rows_once():
    agg = {(CLF, m, "ddim", 5): cell(10.0, 0.1) for m in ("base", "at", "at-detach")}
    rows = [line for line in versus_table(agg, CLF) if line.startswith("| ADM-AT")]
    assert rows == ["| ADM-AT (full) | ADM (base) | 0/1/0 | – | – | – |",
                    "| ADM-AT (full) | ADM-AT (detach) | 0/1/0 | – | – | – |",
                    "| ADM-AT (detach) | ADM (base) | 0/1/0 | – | – | – |"]


def test_versions_name_the_backends_and_group_runs_trained_with_equal_versions():
    from scripts.study_report_common import versions_lines
    rows = [{"backend": "torch 2 on cpu"}, {"backend": "torch 2 on cpu"}, {"backend": "onnxruntime 1 on cpu"},
            {"backend": None}]
    training = [{"model": "base", "versions": {"torch": "2"}}, {"model": "ft", "versions": {"torch": "2"}},
                {"model": "ip", "versions": {"torch": "3"}}, {"model": "at", "versions": None}]
    lines = versions_lines(rows, training)
    assert lines[0].startswith("- this report: python ")
    assert lines[1:] == ["- cells sampled on: onnxruntime 1 on cpu; torch 2 on cpu",
                         "- base, ft trained with: torch 2", "- ip trained with: torch 3"]
