"""Pieces of the study reports on hand-made data: the ADM report's AT-vs-others counts, the versions section."""
from studies.adm_study_report import versus_table

CLF = "fmnist-classifier"


def cell(mean, std):
    return {"mean": mean, "std": std, "n_seeds": 3 if std is not None else 1, "num": 10000}


def test_versus_counts_cells_beyond_the_seed_spread_per_sampler():
    agg = {(CLF, "at", "ddim_gd", 5): cell(10.0, 0.3), (CLF, "base", "ddim_gd", 5): cell(11.0, 0.1),   # 1.0 > 2*0.32: lower
           (CLF, "at", "ddim_gd", 10): cell(8.0, 0.3), (CLF, "base", "ddim_gd", 10): cell(8.5, 0.3),   # 0.5 < 0.85: within
           (CLF, "at", "ddim_gd", 20): cell(9.0, 0.1), (CLF, "base", "ddim_gd", 20): cell(7.0, 0.1),   # higher
           (CLF, "at", "iddpm", 5): cell(5.0, None), (CLF, "base", "iddpm", 5): cell(9.0, None)}  # one seed: skipped
    lines = versus_table(agg, CLF, models=("at",))
    row = next(line for line in lines if line.startswith("| ADM-AT (full) | ADM (base) |"))
    assert row.split(" | ")[2:4] == ["1/1/1", "–"]   # DDIM counted; DPM-Solver has no cells
    assert row.rstrip(" |").endswith("–")             # IDDPM's only cell has one seed
    assert not any("ADM-FT" in line for line in lines)   # no cells for FT: no row


def test_versus_says_what_it_needs_when_no_cell_has_seeds():
    agg = {(CLF, "at", "ddim_gd", 5): cell(10.0, None), (CLF, "base", "ddim_gd", 5): cell(11.0, None)}
    assert versus_table(agg, CLF) == ["(needs two or more sampling seeds per cell)"]


def test_versus_compares_the_two_at_rows_once():
    agg = {(CLF, m, "ddim_gd", 5): cell(10.0, 0.1) for m in ("base", "at", "at-detach")}
    rows = [line for line in versus_table(agg, CLF) if line.startswith("| ADM-AT")]
    assert rows == ["| ADM-AT (full) | ADM (base) | 0/1/0 | – | – | – |",
                    "| ADM-AT (full) | ADM-AT (detach) | 0/1/0 | – | – | – |",
                    "| ADM-AT (detach) | ADM (base) | 0/1/0 | – | – | – |"]


def test_versions_name_the_backends_and_group_runs_trained_with_equal_versions():
    from studies.study_report_common import versions_lines
    rows = [{"backend": "torch 2 on cpu"}, {"backend": "torch 2 on cpu"}, {"backend": "onnxruntime 1 on cpu"},
            {"backend": None}]
    training = [{"model": "base", "versions": {"torch": "2"}}, {"model": "ft", "versions": {"torch": "2"}},
                {"model": "ip", "versions": {"torch": "3"}}, {"model": "at", "versions": None}]
    lines = versions_lines(rows, training)
    assert lines[0].startswith("- this report: python ")
    assert lines[1:] == ["- cells sampled on: onnxruntime 1 on cpu; torch 2 on cpu",
                         "- base, ft trained with: torch 2", "- ip trained with: torch 3"]


def test_one_seed_cells_get_a_bootstrap_std_computed_once_per_feature_cache(tmp_path, monkeypatch):
    import numpy as np

    from studies import adm_study_report as report
    from studies.fid_bootstrap import cached_features
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4), num=np.int64(100))
    monkeypatch.setattr(report.study, "ref_path", lambda out, split, features: tmp_path / "ref.npz")
    cache = report.study.cache_path(tmp_path, "inception", "base", "ddim", 0, 10) / "nfe-10"
    cache.mkdir(parents=True)
    np.savez(cache / "chunk-00000.npz", inception=rng.normal(size=(64, 4)))
    (cache / "key.json").write_text("{}")
    rows = [{"features": "inception", "model": "base", "sampler": s, "eps_scale": lam, "nfe": 10, "seed": 0}
            for s, lam in (("ddim", None), ("es_ddim", 1.0))]   # the ES cell without scaling reuses DDIM's samples
    agg = {("inception", "base", s, 10): cell(3.0, None) for s in ("ddim", "es_ddim")}
    calls = []
    monkeypatch.setattr("studies.fid_bootstrap.cached_features", lambda d: calls.append(d) or cached_features(d))
    first = report.with_bootstrap_noise(tmp_path, agg, rows)
    again = report.with_bootstrap_noise(tmp_path, agg, rows)
    assert len(calls) == 1 and first == again   # both cells read the one cache, and only the first report reads it
    stds = {first[k]["std"] for k in agg}
    assert len(stds) == 1 and stds.pop() > 0 and all(first[k]["std_kind"] == "bootstrap" for k in agg)
    assert agg[("inception", "base", "ddim", 10)]["std"] is None   # the input aggregate is left as it was


def test_table_bolds_each_columns_lowest_mean_and_says_when_seed_counts_differ():
    from studies.adm_study_report import table_markdown
    agg = {(CLF, "base", "ddim_gd", 5): cell(11.0, 0.2), (CLF, "ft", "ddim_gd", 5): cell(10.0, 0.3),
           (CLF, "base", "ddim_gd", 50): cell(7.0, None)}   # a column only the base has, at one seed so far
    lines = table_markdown(agg, CLF)
    assert lines[:2] == ["| method | DDIM 5 | DDIM 50 |", "|---|---|---|"]
    assert lines[2] == "| ADM (base) | 11.00 ± 0.20 | **7.00** |"
    assert lines[3] == "| ADM-FT | **10.00 ± 0.30** | – |"
    assert "1–3 sampling seed(s) per cell (mean ± std over seeds; a cell without ± has one seed)" in lines[-1]
    assert lines[-1].startswith("N = 10000 samples per cell and seed;")


def test_diffusers_default_ddim_goes_to_its_own_table_and_es_cells_reuse_their_own_ddims_samples():
    from studies.adm_study_report import sampled_as, table_markdown
    agg = {(CLF, "base", "ddim_gd", 5): cell(11.0, 0.2), (CLF, "base", "ddim", 5): cell(19.0, 0.2),
           (CLF, "base", "es_ddim", 5): cell(19.0, 0.2)}
    assert table_markdown(agg, CLF)[:3] == ["| method | DDIM 5 |", "|---|---|", "| ADM (base) | **11.00 ± 0.20** |"]
    side = table_markdown(agg, CLF, ("ddim", "es_ddim"))
    assert side[0] == "| method | diffusers DDIM 5 | ES (diffusers DDIM) 5 |"
    assert side[2] == "| ADM (base) | **19.00 ± 0.20** | **19.00 ± 0.20** |"
    assert [sampled_as(s, lam) for s, lam in (("es_ddim", 1.0), ("es_ddim_gd", 1.0), ("es_ddim_gd", 1.01),
                                              ("ddim_gd", None))] == ["ddim", "ddim_gd", "es_ddim_gd", "ddim_gd"]
