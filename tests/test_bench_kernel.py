"""CPU tests of scripts/bench_kernel.py's pure parts: case grid, floor formulas, table, inputs, checks."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernel.py"
_spec = importlib.util.spec_from_file_location("bench_kernel", SCRIPT)
bk = importlib.util.module_from_spec(_spec)
sys.modules["bench_kernel"] = bk  # dataclasses look their module up
_spec.loader.exec_module(bk)

# ANCHORS.md, "Decode attention, one layer": (B, P, S) -> floor µs at 4.24 TB/s and 687 TFLOP/s.
ANCHOR_FLOORS = {(64, 4096, 256): 20.0, (16, 2048, 512): 9.9, (128, 1024, 128): 17.3,
                 (32, 8192, 1024): 39.7, (8, 512, 64): 1.0, (256, 2048, 256): 66.2}


def test_quick_grid_is_the_six_anchor_cases():
    cases = bk.case_grid("quick")
    assert [(c.batch_size, c.prefix_len, c.suffix_len) for c in cases] == list(ANCHOR_FLOORS)
    for c in cases:
        assert (c.num_groups, c.num_qo_heads, c.num_kv_heads, c.head_dim, c.dtype) == (1, 32, 8, 128, "bf16")


def test_full_grid_adds_groups_no_sharing_qwen_and_mha():
    quick, full = bk.case_grid("quick"), bk.case_grid("full")
    assert full[: len(quick)] == quick
    extra = full[len(quick):]
    assert any(c.num_groups > 1 for c in extra)
    assert any(c.prefix_len == 0 for c in extra)
    assert any((c.num_qo_heads, c.num_kv_heads, c.head_dim) == (28, 4, 128) for c in extra)
    assert any((c.num_qo_heads, c.num_kv_heads, c.head_dim) == (32, 32, 128) for c in extra)
    assert len({c.name for c in full}) == len(full)


@pytest.mark.parametrize("shape", list(ANCHOR_FLOORS))
def test_floor_reproduces_anchors(shape):
    floor = bk.floor_us(bk.Case(*shape), 4.24e12, 687e12)
    # within 2%, or within the table's rounding to 0.1 µs (the 1.0 µs case is 1.02 µs unrounded)
    assert abs(floor - ANCHOR_FLOORS[shape]) <= max(0.02 * ANCHOR_FLOORS[shape], 0.05)


def test_floor_formulas_written_out():
    case = bk.Case(8, 512, 64)
    kv = 2 * 8 * 128 * 2 * (512 + 8 * 64)
    qo = 2 * 8 * 32 * 128 * 2
    assert bk.min_bytes(case) == kv + qo
    assert bk.attn_flops(case) == 4 * 32 * 128 * 8 * (512 + 64)
    assert bk.floor_us(case, 1e30, 1e12) == pytest.approx(bk.attn_flops(case) / 1e12 * 1e6)  # compute-bound
    grouped = bk.Case(64, 1000, 10, num_groups=8)  # each group's prefix counted once
    assert bk.min_bytes(grouped) == 2 * 8 * 128 * 2 * (8 * 1000 + 64 * 10) + 2 * 64 * 32 * 128 * 2


@pytest.mark.parametrize("bad", [dict(batch_size=6, num_groups=4), dict(prefix_len=0, suffix_len=0),
                                 dict(num_qo_heads=28, num_kv_heads=8), dict(dtype="fp8")])
def test_case_rejects_inconsistent_shapes(bad):
    with pytest.raises(ValueError):
        bk.Case(**{"batch_size": 8, "prefix_len": 16, "suffix_len": 4, **bad})


def test_filter_cases_by_substring():
    full = bk.case_grid("full")
    assert [c.name for c in bk.filter_cases(full, "B64_P4096,G8")] == [
        c.name for c in full if "B64_P4096" in c.name or "G8" in c.name]
    assert bk.filter_cases(full, None) == full
    assert bk.filter_cases(full, "nothing-like-this") == []


def test_render_table():
    ok = lambda us: {"status": "ok", "us": us, "rel_err": 3e-3}
    rows = [
        {"case": "B64_P4096_S256", "floor_us": 20.0, "impls": {
            "ours": {**ok(25.0), "plan_us": 140.0}, "sglang_triton": ok(225.0),
            "flashinfer_decode": ok(142.5), "flashinfer_cascade": {"status": "wrong", "rel_err": 0.5}}},
        {"case": "B8_P0_S64", "floor_us": 1.0, "impls": {
            "ours": {"status": "error", "note": "boom"}, "sglang_triton": ok(10.0),
            "flashinfer_decode": {"status": "error"}, "flashinfer_cascade": {"status": "skipped"}}},
    ]
    lines = bk.render_table(rows).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert len(lines) == 4 and all(len(c) == len(cells[0]) for c in cells)
    head = cells[0]
    first, second = dict(zip(head, cells[2], strict=True)), dict(zip(head, cells[3], strict=True))
    assert first["floor µs"] == "20.0" and first["ours µs"] == "25.0" and first["plan µs (host)"] == "140"
    assert first["ours/floor"] == "1.25" and first["vs sglang_triton"] == "9.00x"
    assert first["vs flashinfer_decode"] == "5.70x" and first["flashinfer_cascade µs"] == "wrong"
    assert first["vs flashinfer_cascade"] == "-"
    assert second["ours µs"] == "error" and second["ours/floor"] == "-" and second["vs sglang_triton"] == "-"
    assert second["flashinfer_cascade µs"] == "n/a"
    assert bk.render_table([]).count("\n") == 1  # header and separator only


@pytest.mark.parametrize("case", bk.case_grid("tiny") + [bk.Case(6, 5, 3, 3, "h8-8-64", 8, 8, 64)],
                         ids=lambda c: c.name)
def test_make_inputs_layout_matches_oracle_flattening(case):
    inp = bk.make_inputs(case, torch.device("cpu"), seed=1)
    ref = bk.import_kernels().reference
    kv_indptr, kv_indices = ref.cascade_to_flat(*inp[3:8])
    assert torch.equal(inp.kv_indptr, kv_indptr) and torch.equal(inp.kv_indices, kv_indices)
    slots = torch.cat([inp.prefix_kv_indices, inp.suffix_kv_indices]).sort().values
    assert torch.equal(slots, torch.arange(inp.k_buffer.shape[0], dtype=torch.int32))  # a permutation
    indptrs = (inp.group_indptr, inp.prefix_kv_indptr, inp.suffix_kv_indptr, inp.kv_indptr)
    assert all(t.dtype == torch.int32 and t[0] == 0 for t in indptrs)
    assert inp.suffix_kv_indptr[-1] == case.batch_size * case.suffix_len
    assert inp.q.shape == (case.batch_size, case.num_qo_heads, case.head_dim)
    assert inp.q.dtype == bk.DTYPES[case.dtype]


def test_check_impl_catches_unwritten_and_wrong_outputs():
    ref = torch.randn(4, 2, 64)
    out = torch.empty(4, 2, 64, dtype=torch.bfloat16)

    def partial():  # leaves the last row unwritten
        out[:3] = ref[:3].to(out.dtype)
        return out

    assert bk.check_impl(bk.Impl(lambda: out.copy_(ref), out), ref, 2e-2, out.dtype)["status"] == "ok"
    res = bk.check_impl(bk.Impl(partial, out), ref, 2e-2, out.dtype)
    assert res["status"] == "wrong" and res["unwritten"] == 2 * 64 and res["rel_err"] is None
    res = bk.check_impl(bk.Impl(lambda: out.copy_(ref * 1.1), out), ref, 2e-2, out.dtype)
    assert res["status"] == "wrong" and res["rel_err"] == pytest.approx(0.1, rel=0.05)


def test_evaluate_records_failures_instead_of_raising(monkeypatch):
    def broken(inp, kern):
        raise RuntimeError("no such library")

    monkeypatch.setitem(bk.BUILDERS, "ours", broken)
    res = bk.evaluate("ours", None, None, None, 2e-2, None)
    assert res["status"] == "error" and "no such library" in res["note"]
    assert bk.evaluate("flashinfer_decode", None, None, None, 2e-2, None)["status"] == "skipped"


@pytest.mark.skipif(HAS_CUDA, reason="the CPU path runs in the Triton interpreter, set only without CUDA")
def test_cpu_tiny_run_checks_ours_against_the_oracle(tmp_path, capsys):
    out = tmp_path / "kernel_cpu.json"
    assert bk.main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == [c.name for c in bk.case_grid("tiny")]
    for row in rows:
        assert row["impls"]["ours"]["status"] == "ok" and row["impls"]["ours"]["rel_err"] < 2e-2
        assert all(row["impls"][b]["status"] == "skipped" for b in bk.BASELINES)
    assert "| B5_P37_S17_h4-2-64 |" in out.with_suffix(".md").read_text()
    assert capsys.readouterr().out.rstrip().endswith(bk.render_table(rows).splitlines()[-1])


def test_write_plot(tmp_path):
    pytest.importorskip("matplotlib")
    ok = {"status": "ok", "us": 5.0, "rel_err": 1e-3}
    impls = {name: ok for name in bk.IMPLS} | {"flashinfer_cascade": {"status": "error"}}
    rows = [{"case": "B8_P512_S64", "floor_us": 1.0, "impls": impls}]
    bk.write_plot(tmp_path / "k.png", {"gpu": "test"}, rows)
    assert (tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG"
