"""The fault benchmark's client and report (``scripts/bench_faults.py``) against a fake SGLang
``/generate`` on the CPU: every phase's requests end as completed, aborted or rejected, none errored,
and the log lines of a server become the report's columns."""

import asyncio
import json
import socket
import threading
from types import SimpleNamespace

import pytest

from scripts import bench_faults as bf

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web

CTX = 300
GEN_S = 4.5


def _fake_app(aborted: set):
    def is_aborted(rid):  # SGLang's scheduler aborts every rid that starts with an aborted one
        return any(rid.startswith(a) for a in aborted)

    async def generate(request):
        body = await request.json()
        rid, params = body["rid"], body["sampling_params"]
        if len(body["input_ids"]) >= CTX - 6:
            return web.json_response({"error": {"message": "The input is longer than the context"}}, status=400)
        n, want = params.get("n", 1), params["max_new_tokens"]

        def item(done, reason):
            return {"text": "", "meta_info": {"id": rid, "completion_tokens": done, "finish_reason": reason}}

        if body.get("stream"):
            resp = web.StreamResponse()
            await resp.prepare(request)
            for i in range(1, want + 1):
                await asyncio.sleep(0.002)
                stop = is_aborted(rid)
                reason = {"type": "abort"} if stop else ({"type": "length", "length": want} if i == want else None)
                try:
                    await resp.write(f"data: {json.dumps(item(i, reason))}\n\n".encode())
                except ConnectionResetError:  # SGLang aborts a request whose client went away
                    aborted.add(rid)
                    return resp
                if stop:
                    break
            await resp.write(b"data: [DONE]\n\n")
            return resp
        # A non-streamed request runs for GEN_S whatever its length, longer than the abort phase's latest
        # /abort_request (3 s), so an injected abort always finds its request running, however slow the host.
        loop = asyncio.get_running_loop()
        end = loop.time() + GEN_S
        while loop.time() < end:
            await asyncio.sleep(0.01)
            if is_aborted(rid):
                return web.json_response(item(0, {"type": "abort"}))
        out = [item(want, {"type": "length", "length": want})] * n
        return web.json_response(out if n > 1 else out[0])

    async def abort(request):
        aborted.add((await request.json())["rid"])
        return web.Response()

    async def server_info(request):
        return web.json_response({"context_length": CTX, "max_req_input_len": CTX - 6})

    app = web.Application()
    app.router.add_get("/server_info", server_info)
    app.router.add_post("/generate", generate)
    app.router.add_post("/abort_request", abort)
    return app


@pytest.fixture
def fake_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(_fake_app(set()))
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


@pytest.mark.parametrize("phase", bf.PHASES)
def test_phase_outcomes_against_a_fake_server(fake_server, phase):
    args = SimpleNamespace(groups=4, system_len=20, question_len=4, context_length=CTX, request_timeout=60)
    outcomes = asyncio.run(bf.run_phase(phase, fake_server, bf.Traffic(1, 1000), args))
    kinds = [o.kind for o in outcomes]
    assert "errored" not in kinds, [o.detail for o in outcomes if o.kind == "errored"]
    assert kinds.count("completed") > 0
    if phase == "disconnect":
        assert kinds.count("aborted") == len(kinds) // 4
    if phase == "abort":
        assert kinds.count("aborted") >= 16  # two whole groups of 8 at least
    if phase == "edge":
        assert kinds.count("rejected") == 3 and len(kinds) == 32 + 4 + 16 + 2 + 3


def test_judge_counts_short_or_failed_requests_as_errored_unless_injected():
    body = {"rid": "r", "sampling_params": {"max_new_tokens": 4}}
    short = {"meta_info": {"completion_tokens": 3, "finish_reason": {"type": "length"}}}
    assert bf._judge(body, 200, short, injected=False).kind == "errored"
    assert bf._judge(body, 200, short, injected=True).kind == "aborted"
    assert bf._judge(body, 500, "boom", injected=False).kind == "errored"
    assert bf._judge(body, 200, "ok", injected=False, expect_reject=True).kind == "errored"
    assert bf._judge(body, 400, "too long", injected=False, expect_reject=True).kind == "rejected"


def test_log_lines_become_columns_and_totals(tmp_path):
    log = ("packinfer: decode step 20, batch 8, verified 640 layer-steps, max rel err 3.1e-04\n"
           "KV cache pool is full. Retract requests. #retracted_reqs: 3, #new_tokens_gained: 100\n"
           "Traceback (most recent call last):\n"
           "packinfer: idle check 1 passed after forward 99: pool 100 = available 90 + evictable 10 + locked 0,"
           " leaked slots 0\n"
           "packinfer: compaction moved 294 tokens of 1 groups (2 skipped); 294 tokens so far\n"
           "packinfer: prefill dedup held 7 requests so far while their shared prefix was computed once (1 prefix"
           " tokens not recomputed, estimated)\n")
    rows, cumulative = [], {}
    for phase in bf.PHASES:
        row = bf.PhaseRow("base", phase, server_alive_at_end=True)
        bf._fill_row(row, [bf.Outcome("completed"), bf.Outcome("errored", "x")], log, cumulative)
        rows.append(row)
    r = rows[0]
    assert (r.verify_layer_steps, r.verify_max_rel_err, r.retractions, r.server_tracebacks) == (640, 3.1e-4, 3, 1)
    assert (r.integrity_checks_passed, r.leaked_slots, r.errored, r.completed) == (1, 0, 1, 1)
    assert (r.compaction_moved_tokens, r.dedup_held_requests) == (294, 7)
    (total,) = bf.totals(rows)
    assert (total.requests, total.errored, total.server_alive_at_end) == (8, 4, True) and not total.clean()
    args = SimpleNamespace(out_dir=tmp_path, max_total_tokens=100, context_length=CTX, commit="abc")
    bf.write_report(rows, args, "faults_test")
    doc = json.loads((tmp_path / "faults_test.json").read_text())
    assert doc["clean"] is False and len(doc["rows"]) == 5
    assert "| base | total |" in (tmp_path / "faults_test.md").read_text()
