"""benchmarks/bench_block_step.py: a --quick smoke run of the smallest block (SDXL's, tokens / 16, 1 round, no
writing) renders a row per method, with the arithmetic-limit column computed from the frozen floor."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_block_step as bench


@pytest.fixture(scope="module")
def quick_sdxl():
    threads = torch.get_num_threads()
    try:
        return bench.main(["--block", "sdxl", "--quick"])["sdxl"]
    finally:
        torch.set_num_threads(threads)


def table_rows(body: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split(" | ") for line in body.splitlines() if line.startswith("| ")][1:]
    return {row[0].strip(): [cell.strip() for cell in row[1:]] for row in rows}


def test_quick_run_has_a_row_per_method(quick_sdxl):
    args = bench.parse_args(["--block", "sdxl", "--quick"])
    assert args.no_write and args.rounds == 1 and args.tokens_scale == bench.QUICK_SCALE
    rows = table_rows(bench.section_body(quick_sdxl, args))
    assert list(rows) == [method.label for method in bench.METHODS]
    assert quick_sdxl.adapted == sorted(f"attn{i}.{t}" for i in (1, 2) for t in ("to_q", "to_k", "to_v", "to_out.0"))
    assert 0 < quick_sdxl.share < 1


@pytest.mark.parametrize(
    ("method", "factor", "nblocks"),
    [(bench.GSOFT, 3.0, 32), (bench.DOUBLE, 6.0, 32), (bench.OFT_16, 1.5, 16), (bench.OFT_32, 1.5, 32)],
)
def test_limit_column_is_the_floor_times_the_arithmetic(quick_sdxl, method, factor, nblocks):
    rows = {row[0]: row for row in bench.rows_of(quick_sdxl)}
    floor_ms = quick_sdxl.samples[bench.FLOOR.label].wall_median * 1e3
    assert rows[method.label][6] == f"{floor_ms * (1 + factor / nblocks):.1f} (+{factor / nblocks:.1%})"


def test_methods_without_a_limit_show_none(quick_sdxl):
    rows = {row[0]: row for row in bench.rows_of(quick_sdxl)}
    assert rows[bench.LORA.label][6:] == ["-", "-"] and rows[bench.FLOOR.label][5:] == ["-", "-", "-"]


def test_writing_needs_the_section_markers(tmp_path, monkeypatch):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    monkeypatch.setattr(bench, "DOCS", docs)
    with pytest.raises(SystemExit):
        bench.parse_args(["--block", "flux"])
    docs.write_text("<!-- block_step_flux:begin -->\n<!-- block_step_flux:end -->\n")
    assert bench.parse_args(["--block", "flux"]).blocks == ("flux",)
