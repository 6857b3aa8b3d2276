"""CPU tests of the kernel benchmark (scripts.bench_kernel, scripts.kernel_cases,
scripts.kernel_baselines, scripts.kernel_report): case generation, floor formulas, inputs, the FA2
baselines' index and merge logic (with a torch stand-in for FlashAttention), tables, JSON, and ours vs
the oracle in the interpreter."""

import json

import pytest
import torch
from conftest import HAS_CUDA

from scripts import bench_kernel as bk
from scripts import kernel_baselines as kb
from scripts import kernel_cases as kc
from scripts import kernel_report as kr

# ANCHORS.md, "Decode attention, one layer": (B, P, S) -> floor µs at 4.24 TB/s and 687 TFLOP/s.
ANCHOR_FLOORS = {(64, 4096, 256): 20.0, (16, 2048, 512): 9.9, (128, 1024, 128): 17.3,
                 (32, 8192, 1024): 39.7, (8, 512, 64): 1.0, (256, 2048, 256): 66.2}


def test_quick_grid_is_the_six_anchor_cases():
    cases = kc.quick_grid()
    assert [(c.batch_size, c.prefix_len, c.suffix_len) for c in cases] == list(ANCHOR_FLOORS)
    assert [c.name for c in cases] == [f"B{b}_P{p}_S{s}" for b, p, s in ANCHOR_FLOORS]
    for c in cases:
        assert (c.structure, c.group_sizes, c.heads, c.num_qo_heads, c.num_kv_heads, c.head_dim) == (
            "one", (c.batch_size,), "llama3-8b", 32, 8, 128)
        assert (c.dtype, c.layout, c.hetero) == ("bf16", "scattered", False)


def test_full_grid_covers_issue_3():
    quick, full = kc.quick_grid(), kc.full_grid()
    assert full[: len(quick)] == quick and len({c.name for c in full}) == len(full)
    assert {c.structure for c in full} == set(kc.STRUCTURES)
    assert any(c.hetero and c.shares for c in full) and any(c.hetero and c.structure == "none" for c in full)
    assert {c.heads for c in full} == {"llama3-8b", "qwen2.5-7b", "llama3-70b-tp8", "mha-32"}
    assert {c.dtype for c in full} == {"bf16", "fp16"} and {c.layout for c in full} == set(kc.LAYOUTS)
    assert len({c.batch_size for c in full}) >= 5 and len({c.prefix_len for c in full}) >= 5
    assert len({c.suffix_len for c in full}) >= 5
    # the full grid in two calls of the device's 10-minute limit (a minute to spare), merged afterwards
    assert set().union(*bk.FULL_SPLIT) == set(kr.IMPLS) and all("ours" in part for part in bk.FULL_SPLIT)
    for part in bk.FULL_SPLIT:
        assert kc.estimate_seconds(full, bk.REP_MS["full"], part)[0] < 9 * 60
    assert kc.estimate_seconds(quick, bk.REP_MS["quick"], kr.IMPLS)[0] < 6 * 60


@pytest.mark.parametrize("B,G", [(1, 1), (17, 5), (256, 16), (64, 64)])
@pytest.mark.parametrize("seed", [0, 3])
def test_zipf_sizes_sum_to_batch_and_are_deterministic(B, G, seed):
    case = kc.make_case(B, 100, 10, "zipf", G, seed=seed)
    assert sum(case.group_sizes) == B and len(case.group_sizes) == G and min(case.group_sizes) >= 1
    assert kc.make_case(B, 100, 10, "zipf", G, seed=seed) == case  # same parameters, same case
    assert case.name == f"B{B}_P100_S10_zipf{G}" + (f"_seed{seed}" if seed else "")


def test_zipf_is_skewed_and_depends_on_the_seed():
    sizes = [kc.make_case(256, 64, 8, "zipf", 16, seed=s).group_sizes for s in range(4)]
    assert len(set(sizes)) > 1
    assert all(s[0] > 256 / 16 and s[0] == max(s) for s in sizes)  # the top rank holds the most


@pytest.mark.parametrize("structure,G", [("one", 1), ("equal", 4), ("zipf", 5), ("none", 1)])
def test_heterogeneous_lengths_in_range(structure, G):
    P = 0 if structure == "none" else 300
    case = kc.make_case(40, P, 64, structure, G, hetero=True, seed=7)
    assert all(16 <= s <= 112 for s in case.suffix_lens) and len(set(case.suffix_lens)) > 1
    assert all(150 <= p <= 450 for p in case.prefix_lens) if P else set(case.prefix_lens) == {0}
    assert kc.make_case(40, P, 64, structure, G, hetero=True, seed=7) == case
    assert kc.make_case(40, P, 64, structure, G, hetero=True, seed=8).suffix_lens != case.suffix_lens


def test_no_sharing_is_flat_decode():
    case = kc.make_case(12, 0, 30, "none")
    assert case.group_sizes == (1,) * 12 and case.prefix_lens == (0,) * 12 and case.num_groups == 12
    assert not case.shares and case.name == "B12_P0_S30"
    assert kc.make_case(12, 30, 5, "equal", 3).group_sizes == (4, 4, 4)
    assert not kc.make_case(4, 30, 5, "equal", 4).shares  # groups of one share nothing


@pytest.mark.parametrize("bad", [{"structure": "equal", "num_groups": 5},
                                 {"structure": "one", "num_groups": 2},
                                 {"structure": "zipf", "num_groups": 9}, {"structure": "none"},
                                 {"prefix_len": 0}, {"suffix_len": 0}, {"structure": "tree"},
                                 {"heads": "llama-2"}, {"dtype": "fp8"}, {"layout": "paged"}])
def test_make_case_rejects_inconsistent_parameters(bad):
    with pytest.raises(ValueError):
        kc.make_case(**{"batch_size": 8, "prefix_len": 16, "suffix_len": 4, **bad})


def test_case_rejects_inconsistent_tuples():
    good = kc.make_case(4, 16, 4, "equal", 2)
    with pytest.raises(ValueError, match="groups of sizes"):
        kc.Case(good.name, 4, 16, 4, "equal", 2, (3, 2), (16, 16), (4,) * 4)
    with pytest.raises(ValueError, match="KV token"):
        kc.Case(good.name, 2, 0, 0, "none", 2, (1, 1), (0, 0), (0, 3))


@pytest.mark.parametrize("shape", list(ANCHOR_FLOORS))
def test_floor_reproduces_anchors(shape):
    floor = kc.floor_us(kc.make_case(*shape), *kc.ANCHOR_RATES)
    # within 2%, or within the table's rounding to 0.1 µs (the 1.0 µs case is 1.02 µs unrounded)
    assert abs(floor - ANCHOR_FLOORS[shape]) <= max(0.02 * ANCHOR_FLOORS[shape], 0.05)


def test_floor_formulas_by_hand():
    case = kc.make_case(8, 512, 64)
    assert kc.min_bytes(case) == 2 * 8 * 128 * 2 * (512 + 8 * 64) + 2 * 8 * 32 * 128 * 2
    assert kc.attn_flops(case) == 4 * 32 * 128 * 8 * (512 + 64)
    assert kc.floor_us(case, 1e30, 1e12) == pytest.approx(kc.attn_flops(case) / 1e12 * 1e6)  # compute-bound
    assert kc.floor_us(case, 1e12, 1e30) == pytest.approx(kc.min_bytes(case) / 1e12 * 1e6)  # memory-bound
    # Explicit small batch: groups of 2 and 1 requests, prefixes 10 and 20, suffixes 1, 2, 3; fp16 2/1/64.
    small = kc.Case("x", 3, 15, 2, "zipf", 2, (2, 1), (10, 20), (1, 2, 3), heads="h2-2-64", dtype="fp16")
    assert small.request_prefix_lens == (10, 10, 20)
    assert kc.min_bytes(small) == 2 * 2 * 64 * 2 * (10 + 20 + 1 + 2 + 3) + 2 * 3 * 2 * 64 * 2
    assert kc.attn_flops(small) == 4 * 2 * 64 * (11 + 12 + 23)


@pytest.mark.parametrize("case", kc.tiny_grid() + [kc.make_case(6, 5, 3, "zipf", 3, heads="mha-32")],
                         ids=lambda c: c.name)
def test_make_inputs_layout_matches_oracle_flattening(case):
    inp = kc.make_inputs(case, torch.device("cpu"), seed=1)
    ref = bk.import_kernels().reference
    kv_indptr, kv_indices = ref.cascade_to_flat(*inp[3:8])
    assert torch.equal(inp.kv_indptr, kv_indptr) and torch.equal(inp.kv_indices, kv_indices)
    slots = torch.cat([inp.prefix_kv_indices, inp.suffix_kv_indices])
    assert torch.equal(slots.sort().values, torch.arange(inp.k_buffer.shape[0], dtype=torch.int32))
    if case.layout == "contiguous":
        assert torch.equal(slots, torch.arange(len(slots), dtype=torch.int32))
    indptrs = (inp.group_indptr, inp.prefix_kv_indptr, inp.suffix_kv_indptr, inp.kv_indptr)
    assert all(t.dtype == torch.int32 and t[0] == 0 for t in indptrs)
    assert inp.group_indptr.diff().tolist() == list(case.group_sizes)
    assert inp.prefix_kv_indptr.diff().tolist() == list(case.prefix_lens)
    assert inp.suffix_kv_indptr.diff().tolist() == list(case.suffix_lens)
    assert inp.q.shape == (case.batch_size, case.num_qo_heads, case.head_dim)
    assert inp.q.dtype == kc.DTYPES[case.dtype]


def _fa2_stand_in(q, k, v, cu_q, cu_k, max_q, max_k, sm_scale):
    """FA2 varlen in plain torch: per sequence, non-causal, GQA; lse ``[num_qo_heads, total_q]``."""
    gqa, out = q.shape[1] // k.shape[1], torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0])
    for i in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        assert cu_q[i + 1] - cu_q[i] <= max_q and cu_k[i + 1] - cu_k[i] <= max_k
        kk, vv = (t[ks].float().repeat_interleave(gqa, 1) for t in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q[qs].float(), kk) * sm_scale
        lse[:, qs] = torch.logsumexp(scores, -1)
        out[qs] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv).to(q.dtype)
    return out, lse


@pytest.mark.parametrize("case", [c for c in kc.tiny_grid() if c.shares] + [kc.make_case(6, 0, 9, "none")],
                         ids=lambda c: c.name)
def test_fa2_baselines_gather_and_merge(case, monkeypatch):
    monkeypatch.setattr(kb, "fa2_varlen", _fa2_stand_in)
    monkeypatch.setattr(kb, "_check_fa2", lambda inp: None)
    inp = kc.make_inputs(case, torch.device("cpu"), seed=2)
    ref = bk.import_kernels().reference.packed_cascade_attention_ref(*inp.cascade_args())[0]
    varlen = kb.build_fa2_varlen(inp)
    assert bk.check_impl(varlen, ref, 2e-2, inp.q.dtype)["status"] == "ok"
    assert varlen.extra["gather_timed"] is False and set(varlen.side) == {"gather"}
    varlen.side["gather"]()  # refills the dense copies in place
    if not case.shares:
        with pytest.raises(kb.Skipped):
            kb.build_fa2_cascade(inp)
        return
    res = bk.check_impl(kb.build_fa2_cascade(inp), ref, 2e-2, inp.q.dtype)
    assert res["status"] == "ok" and res["rel_err"] < 1e-2


def _ok(us):
    return {"status": "ok", "us": us, "rel_err": 3e-3}


def _row(case, floor_us, **impls):
    row = {"case": case.name, **{k: v for k, v in vars(case).items() if k != "name"}, "shares": case.shares,
           "floor_us": floor_us, "min_bytes": kc.min_bytes(case), "flops": kc.attn_flops(case),
           "impls": {name: impls.get(name, {"status": "skipped"}) for name in kr.IMPLS}}
    return kr.summarize_row(row)


def test_summarize_row_and_issue4_targets():
    anchor = _row(kc.make_case(64, 4096, 256), 20.0, ours={**_ok(25.0), "plan_us": 140.0},
                  sglang_triton=_ok(225.0), flashinfer_decode=_ok(142.5),
                  flashinfer_cascade={"status": "wrong", "rel_err": 0.5}, fa2_varlen=_ok(50.0))
    ours = anchor["impls"]["ours"]
    assert ours["x_floor"] == pytest.approx(1.25)
    assert ours["tbps"] == pytest.approx(kc.min_bytes(kc.make_case(64, 4096, 256)) / 25e-6 / 1e12)
    assert anchor["speedup"]["sglang_triton"] == pytest.approx(9.0)
    assert anchor["speedup"]["fa2_cascade"] is None
    assert anchor["best_baseline"] == "fa2_varlen" and anchor["speedup_best"] == pytest.approx(2.0)
    assert [t["ok"] for t in anchor["issue4"]] == [True, True]  # <= 2x floor; < best of triton/fi
    flat = _row(kc.make_case(64, 0, 4096, "none"), 100.0, ours=_ok(106.0), flashinfer_decode=_ok(100.0))
    assert [(t["ok"], round(t["value"], 2)) for t in flat["issue4"]] == [(False, 1.06)]
    het = _row(kc.make_case(64, 4096, 256, hetero=True), 20.0, ours=_ok(50.0), flashinfer_decode=_ok(51.0))
    assert [t["ok"] for t in het["issue4"]] == [True, True]  # faster, and within 5%; no floor target
    broken = _row(kc.make_case(8, 512, 64), 1.0, ours={"status": "error", "note": "boom"})
    assert [t["ok"] for t in broken["issue4"]] == [None] and broken["speedup_best"] is None


_META = {"gpu": "NVIDIA H200", "torch": "t", "triton": "t", "sglang": "s", "flashinfer": "f", "date": "d",
         "rates_source": "measured in this run", "timing": "t", "l2": "warm", "tolerance": {}, "fa2_note": "n",
         "copy_bandwidth": 2.77e12}


def test_floor_is_raised_to_the_fastest_achieved_bandwidth(tmp_path, capsys):
    """A floor a kernel beats is no floor: the probes' bandwidth gives way to the best achieved one."""
    anchor, flat = kc.make_case(64, 4096, 256), kc.make_case(64, 0, 4096, "none")
    bw, rate = 3.54e12, 680e12
    floors = [kc.floor_us(c, bw, rate) for c in (anchor, flat)]
    rows = [_row(anchor, floors[0], ours=_ok(48.9), flashinfer_decode=_ok(142.0)),
            _row(flat, floors[1], ours=_ok(0.9 * floors[1]), flashinfer_decode=_ok(floors[1]))]
    meta = {"bandwidth": bw, "matmul_rate": rate}
    achieved = kr.raise_floor_to_achieved(meta, rows)
    assert achieved == pytest.approx(bw / 0.9) and meta["bandwidth"] == achieved and meta["bandwidth_probe"] == bw
    assert rows[1]["impls"]["ours"]["x_floor"] == pytest.approx(1.0)
    assert rows[0]["floor_us"] == pytest.approx(kc.floor_us(anchor, achieved, rate))
    assert rows[0]["issue4"][0]["value"] == pytest.approx(48.9 / rows[0]["floor_us"])
    assert kr.raise_floor_to_achieved(meta, rows) is None and meta["bandwidth_probe"] == bw  # idempotent
    path = kr.write_outputs(tmp_path, "kernel_h200_t", {**_META, "bandwidth": bw, "matmul_rate": rate},
                            [_row(anchor, floors[0], ours=_ok(48.9)),
                             _row(flat, floors[1], ours=_ok(0.9 * floors[1]))], plot=False)
    assert kr.main([str(path)]) == 0 and "raised to the achieved rate" in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["meta"]["bandwidth"] == pytest.approx(achieved)
    assert "above the probes' 3.54 TB/s" in path.with_suffix(".md").read_text()


def test_render_table_console_line_and_targets():
    rows = [_row(kc.make_case(64, 4096, 256), 20.0, ours={**_ok(25.0), "plan_us": 140.0},
                 sglang_triton=_ok(225.0), flashinfer_decode=_ok(142.5),
                 flashinfer_cascade={"status": "wrong", "rel_err": 0.5}),
            _row(kc.make_case(8, 0, 64, "none"), 1.0, ours={"status": "error", "note": "boom"},
                 sglang_triton=_ok(10.0), flashinfer_decode={"status": "error"})]
    lines = kr.render_table(rows).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert len(lines) == 4 and all(len(c) == len(cells[0]) for c in cells)
    first, second = (dict(zip(cells[0], cells[i], strict=True)) for i in (2, 3))
    assert first["floor µs"] == "20.0" and first["ours µs"] == "25.0" and first["plan µs (host)"] == "140"
    assert first["ours x floor"] == "1.25x" and first["vs triton"] == "9.00x"
    assert first["vs fi_dec"] == "5.70x"
    assert first["fi_casc µs"] == "wrong" and first["vs fi_casc"] == "-" and first["fa2 µs"] == "n/a"
    assert first["vs best"] == "5.70x (fi_dec)" and first["issue 4"] == "ok ok"
    assert first["ours TB/s"] == f"{rows[0]['impls']['ours']['tbps']:.2f}"
    assert second["ours µs"] == "error" and second["ours x floor"] == "-" and second["vs triton"] == "-"
    assert second["fi_dec µs"] == "error" and second["issue 4"] == "?"
    assert kr.render_table([]).count("\n") == 1  # header and separator only
    line = kr.console_line(rows[0])
    assert line.startswith("B64_P4096_S256") and "ours    25.0" in line and "1.25x floor" in line
    assert "triton 225.0 (9.00x)" in line and "best fi_dec 5.70x" in line and "\n" not in line
    targets = kr.render_targets(rows)
    assert targets.startswith("Issue 4 kernel targets: 2 of 3 met")
    miss = "- unmeasured B8_P0_S64: ours <= 1.05x best of triton/fi_dec/fi_casc (triton): not measured"
    assert miss in targets


def test_output_stem():
    assert kr.output_stem("NVIDIA H100 80GB HBM3", "quick") == "kernel_h100_quick"
    assert kr.output_stem("NVIDIA H200", "full") == "kernel_h200_full"
    assert kr.output_stem("cpu (Triton interpreter)", "tiny") == "kernel_cpu_tiny"


def test_check_impl_catches_unwritten_and_wrong_outputs():
    ref = torch.randn(4, 2, 64)
    out = torch.empty(4, 2, 64, dtype=torch.bfloat16)

    def partial():  # leaves the last row unwritten
        out[:3] = ref[:3].to(out.dtype)
        return out

    assert bk.check_impl(kb.Impl(lambda: out.copy_(ref), out), ref, 2e-2, out.dtype)["status"] == "ok"
    res = bk.check_impl(kb.Impl(partial, out), ref, 2e-2, out.dtype)
    assert res["status"] == "wrong" and res["unwritten"] == 2 * 64 and res["rel_err"] is None
    res = bk.check_impl(kb.Impl(lambda: out.copy_(ref * 1.1), out), ref, 2e-2, out.dtype)
    assert res["status"] == "wrong" and res["rel_err"] == pytest.approx(0.1, rel=0.05)


def test_evaluate_records_failures_instead_of_raising(monkeypatch):
    def broken(inp):
        raise RuntimeError("no such library")

    monkeypatch.setitem(kb.BASELINE_BUILDERS, "fa2_varlen", broken)
    res = bk.evaluate("fa2_varlen", None, None, None, 2e-2, 10.0)
    assert res["status"] == "error" and "no such library" in res["note"] and "setup_s" in res
    def skipped(inp):
        raise kb.Skipped("n/a")

    monkeypatch.setitem(kb.BASELINE_BUILDERS, "fa2_varlen", skipped)
    assert bk.evaluate("fa2_varlen", None, None, None, 2e-2, 10.0) == {"status": "skipped", "note": "n/a"}
    assert bk.evaluate("flashinfer_decode", None, None, None, 2e-2, None)["status"] == "skipped"


def test_list_prints_cases_and_estimate(capsys):
    assert bk.main(["--full", "--cases", "zipf,het", "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    names = [c.name for c in kc.full_grid() if "zipf" in c.name or "het" in c.name]
    assert out[0].startswith(f"{len(names)} full cases x {len(kr.IMPLS)} implementations") and "min on an H100" in out[0]
    assert out[1:] == names


@pytest.mark.skipif(HAS_CUDA, reason="the CPU path runs in the Triton interpreter, set only without CUDA")
def test_cpu_tiny_run_checks_ours_against_the_oracle(tmp_path, capsys):
    assert bk.main(["--device", "cpu", "--tiny", "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "kernel_cpu_tiny.json").read_text())["rows"]
    assert [r["case"] for r in rows] == [c.name for c in kc.tiny_grid()]
    assert {r["structure"] for r in rows} == set(kc.STRUCTURES) and any(r["hetero"] for r in rows)
    for row in rows:
        assert row["impls"]["ours"]["status"] == "ok" and row["impls"]["ours"]["rel_err"] < 1e-2
        assert all(row["impls"][b]["status"] == "skipped" for b in kr.BASELINES)
    md = (tmp_path / "kernel_cpu_tiny.md").read_text()
    assert "| B9_P40_S9_zipf3_h6-2-64_seed1 |" in md and "Issue 4 kernel targets" in md
    assert kr.console_line(rows[-1]) in capsys.readouterr().out


def test_write_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row(kc.make_case(8, 512, 64), 1.0, ours=_ok(5.0), flashinfer_decode=_ok(10.0)),
            _row(kc.make_case(64, 0, 4096, "none"), 100.0, ours=_ok(120.0), sglang_triton=_ok(110.0)),
            _row(kc.make_case(16, 2048, 512), 9.0, ours={"status": "error"})]
    kr.write_plot(tmp_path / "k.png", {"gpu": "test"}, rows)
    assert (tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG"


def test_two_runs_of_the_full_grid_merge_into_one_report(tmp_path):
    case = kc.quick_grid()[0]
    meta = {"gpu": "H200", "torch": "2.11", "triton": "3.6", "sglang": "0.5.17", "flashinfer": "0.6.15", "date": "d",
            "bandwidth": 1e15, "matmul_rate": 1e15, "rates_source": "probe", "timing": "graph", "l2": "warm",
            "tolerance": 2e-2, "fa2_note": "-"}
    first = {"meta": {**meta, "command": "a", "wall_s": 10.0}, "rows": [_row(case, 10.0, ours={"status": "ok", "us": 20.0},
                                                                     flashinfer_cascade={"status": "ok", "us": 40.0})]}
    second = {"meta": {**meta, "command": "b", "wall_s": 5.0}, "rows": [_row(case, 10.0, ours={"status": "ok", "us": 21.0},
                                                                      flashinfer_cascade_fa2={"status": "ok", "us": 30.0})]}
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(second))
    out = tmp_path / "merged.json"
    assert kr.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    (row,) = merged["rows"]
    assert row["impls"]["ours"]["us"] == 20.0 and row["ours_second_run"]["us"] == 21.0
    assert row["impls"]["flashinfer_cascade_fa2"]["us"] == 30.0 and row["best_baseline"] == "flashinfer_cascade_fa2"
    assert row["speedup_best"] == pytest.approx(1.5) and merged["meta"]["wall_s"] == 15.0
    assert out.with_suffix(".md").exists()
