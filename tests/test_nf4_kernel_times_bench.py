"""bench/nf4_kernel_times.py's arithmetic on made-up profiler records (the benchmark itself needs a GPU), and its
figure drawn from a made-up result."""
import json

import pytest

from conftest import bench_module


def test_per_call_splits_each_call_into_kernel_sum_tail_and_gap():
    times = bench_module("nf4_kernel_times")
    records = []
    for call in range(3):  # the NF4 kernel 10 us, the sum ending 2 us after it, the next call 1.5 us later
        t = call * 13.5
        records += [("_nf4_matmul_kernel_0d1d", t, t + 10.0), ("_sum_splits_kernel_0d1d", t + 1.0, t + 12.0)]
    got = times.per_call(records, "_nf4_matmul_kernel", "_sum_splits_kernel")
    assert got == pytest.approx({"first_us": 10.0, "span_us": 12.0, "gap_us": 1.5, "tail_us": 2.0})
    alone = times.per_call([r for r in records if "nf4" in r[0]], "_nf4_matmul_kernel", None)
    assert alone == pytest.approx({"first_us": 10.0, "span_us": 10.0, "gap_us": 3.5})
    with pytest.raises(RuntimeError):  # a call without its sum: the records do not pair up
        times.per_call(records[:-1], "_nf4_matmul_kernel", "_sum_splits_kernel")


def test_figure_of_a_made_up_result(tmp_path):
    figures = bench_module("figures")
    rows = [{"weight": "8b o_proj", "rows": m, "nf4_first_us": 11.0, "nf4_tail_us": 2.0 if m > 16 else None,
             "nf4_gap_us": 1.5, "dense_first_us": 13.0, "dense_gap_us": 1.4} for m in (16, 48, 64)]
    path = tmp_path / "nf4_kernel_times.json"
    path.write_text(json.dumps({"device": "made up", "kernel_times": rows}))
    png = figures.draw(path, tmp_path / "figure.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
