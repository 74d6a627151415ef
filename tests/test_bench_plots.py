"""Every benchmark JSON in bench/results/ has its PNG beside it, and bench/figures.py draws each of them from
the JSON alone (what a benchmark does at the end of a run, and `python bench/figures.py` does later)."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO

RESULTS = REPO / "bench" / "results"
_spec = importlib.util.spec_from_file_location("bench_figures", REPO / "bench" / "figures.py")  # bench/ stays off sys.path
figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figures)

JSONS = sorted(RESULTS.glob("*.json"))


def test_every_benchmark_json_has_a_png_beside_it():
    assert JSONS
    missing = [p.name for p in JSONS if not p.with_suffix(".png").exists()]
    assert not missing, f"no PNG beside {missing}: python bench/figures.py bench/results/*.json"


@pytest.mark.parametrize("json_path", [p for p in JSONS if figures.drawer(p)], ids=lambda p: p.stem)
def test_figure_is_drawn_from_the_json(json_path, tmp_path):
    png = figures.draw(json_path, tmp_path / "figure.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_each_json_has_a_drawer_or_its_script_draws_it():
    undrawn = [p.name for p in JSONS if figures.drawer(p) is None]
    assert undrawn and all(name.startswith("serve_trace") for name in undrawn), undrawn  # serve_trace.py: plot()


def test_nf4_sum_ab_leaves_out_a_tiling_that_never_ran(tmp_path):
    """bench/nf4_matmul.py --sum-ab's drawer on a made-up result where one tiling never ran (inf): left out."""
    import json
    rows = [{"weight": "8b o_proj", "rows": m, "dense_us": 14.5, "unsplit_us": 40.0, "second_launch_us": 16.2,
             "in_kernel_us": 15.1, "codes_as_b_us": float("inf") if m == 16 else 15.6} for m in (16, 48, 64)]
    path = tmp_path / "nf4_sum_ab.json"
    path.write_text(json.dumps({"device": "made up", "sum_ab": rows}))
    png = figures.draw(path, tmp_path / "figure.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
