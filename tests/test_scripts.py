"""CPU tests of scripts.make_model_dir and packinfer_sglang.model_dirs (the serving benchmark's
tests are in test_bench_serving.py), of the lab tools in scripts.lab, and of the layout of the
``scripts`` package itself."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import transformers

from packinfer_sglang.model_dirs import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    SHAPES,
    SPECIAL_TOKENS,
    make_model_dir,
    tokenizer_dir,
)
from scripts import make_model_dir as make_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {shape: make_model_dir(shape, root / shape) for shape in SHAPES}


@pytest.fixture(scope="module")
def tokenizers(model_dirs) -> dict:
    load = transformers.AutoTokenizer.from_pretrained
    return {shape: load(tokenizer_dir(d)) for shape, d in model_dirs.items()}


# ---------------------------------------------------------------------------------------------
# Model directories
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_config_matches_shape(model_dirs, shape):
    s, config = SHAPES[shape], transformers.AutoConfig.from_pretrained(model_dirs[shape])
    assert config.architectures == [s.architecture] and config.model_type == s.model_type
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (
        s.hidden_size, s.num_layers, s.intermediate_size)
    assert (config.num_attention_heads, config.num_key_value_heads) == (s.num_qo_heads, s.num_kv_heads)
    assert config.hidden_size // config.num_attention_heads == s.head_dim
    assert (config.vocab_size, config.max_position_embeddings) == (s.vocab_size, s.max_position_embeddings)
    assert config.rope_parameters["rope_theta"] == s.rope_theta
    assert str(config.dtype) == "torch.bfloat16"


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_sglang_model_config_parses(model_dirs, shape):
    from sglang.srt.configs.model_config import ModelConfig

    s, config = SHAPES[shape], ModelConfig(model_path=str(model_dirs[shape]))
    assert (config.num_attention_heads, config.get_num_kv_heads(1), config.head_dim) == (
        s.num_qo_heads, s.num_kv_heads, s.head_dim)
    assert (config.num_hidden_layers, config.vocab_size, config.context_len) == (
        s.num_layers, s.vocab_size, s.max_position_embeddings)
    assert str(config.dtype) == "torch.bfloat16"


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("num_words", [1, 17, 37, 4096])
def test_random_words_encode_to_one_token_each(tokenizers, shape, num_words):
    tok, rng = tokenizers[shape], random.Random(num_words)
    words = [f"w{rng.randrange(SHAPES[shape].vocab_size - len(SPECIAL_TOKENS))}" for _ in range(num_words)]
    ids = tok.encode(" ".join(words))  # no BOS/EOS added: exactly one id per word
    assert len(ids) == num_words
    assert tok.convert_ids_to_tokens(ids) == words


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_decode_encode_round_trip_over_whole_vocab(tokenizers, shape):
    """What the benchmark's gen_prompt does: decode random ids (special ones included), re-encode."""
    tok = tokenizers[shape]
    assert len(tok) == SHAPES[shape].vocab_size
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS_TOKEN_ID, EOS_TOKEN_ID)
    ids = random.Random(shape).choices(range(len(tok)), k=1000) + [0, 1, 2, len(tok) - 1]
    assert tok.encode(tok.decode(ids)) == ids


@pytest.mark.parametrize("shape", ["tiny", "qwen2.5-7b"])
def test_sglang_loaders_and_gsp_prompt_lengths(model_dirs, shape):
    """SGLang's server loader and the client's loader + gen_prompt give exact prompt lengths,
    including the system prompt + "\\n\\n" + question join of generated-shared-prefix."""
    from sglang.benchmark.datasets.common import gen_prompt
    from sglang.benchmark.utils import get_tokenizer as client_tokenizer
    from sglang.srt.utils.hf_transformers.tokenizer import get_tokenizer as server_tokenizer

    path = str(tokenizer_dir(model_dirs[shape]))
    server, client = server_tokenizer(path), client_tokenizer(path)
    random.seed(0)
    prompt = f"{gen_prompt(client, 300)}\n\n{gen_prompt(client, 17)}"
    assert len(client.encode(prompt)) == 317
    assert server.encode(prompt) == client.encode(prompt)


def test_make_model_dir_cli(tmp_path, capsys):
    make_script.main(["--shape", "tiny", "--out", str(tmp_path / "tiny")])
    root = tmp_path / "tiny"
    names = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert names == {"config.json", "generation_config.json", "tokenizer/tokenizer.json",
                     "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"}
    assert "LlamaForCausalLM" in capsys.readouterr().out


def test_every_flag_has_help():
    for parser in (make_script.build_parser(),):
        for action in parser._actions:
            assert action.help, f"{action.option_strings} has no help"


PRODUCT_TOOLS = {"bench_kernel", "kernel_cases", "kernel_baselines", "kernel_report", "bench_serving",
                 "serving_workloads", "serving_procs", "serving_report", "serving_client", "serving_parallel",
                 "steady_decode", "make_model_dir", "bench_faults"}
LAB_TOOLS = {"profile_ncu", "profile_host_step", "kernel_resources", "bench_compaction", "sim_prefill_dedup"}


def test_every_tool_imports_as_part_of_the_scripts_package():
    """Issue 18: the product's tools are modules of ``scripts``, the lab's of ``scripts.lab``, each
    importable by its package name alone (relative imports between them); the concluded A/B and
    sweep tools are gone."""
    import importlib

    for package, names in (("scripts", PRODUCT_TOOLS), ("scripts.lab", LAB_TOOLS)):
        folder = REPO.joinpath(*package.split("."))
        assert {p.stem for p in folder.glob("*.py")} == names | {"__init__"}
        assert importlib.import_module(package).__doc__
        for name in sorted(names):
            module = importlib.import_module(f"{package}.{name}")
            assert module.__doc__, f"{package}.{name} has no docstring"


def test_bench_compaction_table_and_cpu_refusal():
    """The report of ``scripts.lab.bench_compaction`` from rows of both studies; without a GPU it
    exits with a usage error instead of a traceback."""
    from scripts.lab import bench_compaction as bc
    meta = {"gpu": "g", "torch": "t", "triton": "tr", "sglang": "s", "date": "d", "copy_shape": "32 layers"}
    kernel = [{"case": "B1", "layout": "contiguous", "kv_base": b, "items": 4, "us": 2.0, "fast_items": 3,
               "bases_us": 1.5} for b in (False, True)]
    kernel[1]["us"] = None
    copy = [{"tokens": 256, "us": 10.0, "ns_per_token": 39.1, "bytes": 1, "gb_s": 900.0}]
    text = bc.markdown(meta, kernel, copy)
    assert "| B1 | contiguous | 2.0 | fail | 3/4 | 1.5 |" in text and "| 256 | 10.0 | 39.1 | 900 |" in text
    if not bc.torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            bc.main(["--out-dir", "/nonexistent"])
        assert e.value.code == 2


def test_kernel_resources_compiles_for_hopper_without_a_gpu():
    """``python -m scripts.lab.kernel_resources``: the packed kernel compiled for sm_90 by Triton's
    bundled ptxas (in a process without the interpreter). On the H200, kernel_occupancy measured 2
    programs per SM for the default launch and 3 for the eager plain-decode tiles (16 rows, 64-token
    blocks, 3 stages; session 7's server log); the offline counts must agree."""
    import os
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "scripts.lab.kernel_resources", "--variants", "", "pbm=16",
                          "guard=1,role=1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:6]]
            for line in run.stdout.splitlines() if line.startswith("| ") and "variant" not in line}
    assert rows["default"][3] == "2" and rows["pbm=16"][3] == "3"
    assert rows["guard=1,role=1"][3] == "2"  # the graphs' flat launch: as the eager one
    # issue 21's compiler check: K/V tiles are gathered by 16-byte cp.async in a multi-stage ring;
    # the 64-row prefix tile runs wgmma (each waited for at once), the 16-row tiles mma.sync
    full = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[6:11]]
            for line in run.stdout.splitlines() if line.startswith("| ") and "variant" not in line}
    assert int(full["default"][0]) > 0 and int(full["default"][2]) > 0 and full["default"][3] == "[0]"
    assert int(full["pbm=16"][0]) > 0 and full["pbm=16"][2] == "0" and int(full["pbm=16"][4]) > 0
    from scripts.lab import kernel_resources as kr
    assert kr.parse_variant("pbm=16, stages=3") == {"pbm": 16, "stages": 3}
    with pytest.raises(SystemExit, match="unknown"):
        kr.parse_variant("tiles=3")


def test_profile_ncu_reads_the_raw_page(tmp_path):
    """``scripts.lab.profile_ncu``: ncu's raw CSV (messages and the child's output around it, a units
    row) is read by metric name, times and bytes converted by their units, stall reasons sorted."""
    from scripts.lab import profile_ncu as pn
    raw = tmp_path / "raw.csv"
    raw.write_text('==PROF== Connected to process 1\nB64_P4096_S32: 96 items, 576 partials\n'
                   '"ID","Kernel Name","gpu__time_duration.sum","dram__bytes_read.sum","lts__t_sectors_srcunit_tex_op_read.sum",'
                   '"smsp__average_warps_issue_stalled_wait_per_issue_active.ratio",'
                   '"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",'
                   '"smsp__average_warps_issue_stalled_selected_per_issue_active.ratio"\n'
                   '"","","ns","byte","sector","","",""\n'
                   '"0","_packed_attn_partial_kernel","30,500","84,000,000","2,000,000","3.5","12.25","1.0"\n')
    row = pn.summarize("B64_P4096_S32", pn.read_raw(raw))
    assert row["duration us"] == pytest.approx(30.5) and row["DRAM read GB"] == pytest.approx(0.084)
    assert row["L2 to SM GB"] == pytest.approx(0.064) and row["tensor pipe %"] is None
    assert list(row["stalls"]) == ["long_scoreboard", "wait"]
    assert row["top stalls"] == "long_scoreboard 12.2, wait 3.5"


def test_flat_graph_grid_holds_every_grid_case_unsplit_by_the_cap():
    """The flat CUDA-graph grid (``graph_grid_items``) holds the natural plan of every case of the
    kernel grid on an H200-sized GPU (132 SMs, 2 programs each), so graphs never coarsen those
    plans; the docstring's "about half" is checked too."""
    import numpy as np
    from packinfer_sglang.kernels.plan import plan_work

    from packinfer_sglang.decode_step import graph_grid_items
    from scripts import kernel_cases as kc
    indptr = lambda lens: np.concatenate([[0], np.cumsum(lens)])
    worst = 0.0
    for case in kc.full_grid():
        plain = sum(case.prefix_lens) == 0
        work = plan_work(indptr(case.group_sizes), indptr(case.prefix_lens), indptr(case.suffix_lens),
                         gqa_group_size=case.num_qo_heads // case.num_kv_heads, num_kv_heads=case.num_kv_heads,
                         prefix_block_m=64, num_sms=132, programs_per_sm=2, kv_align=128 if plain else 64)
        items = len(work.prefix_items) + len(work.suffix_items)
        worst = max(worst, items / graph_grid_items(case.batch_size, 132, 2, case.num_kv_heads))
    assert worst <= 0.55, worst


def test_prefill_dedup_model_computes_each_burst_prefix_once():
    """``scripts.lab.sim_prefill_dedup``: bursts of one group recompute the prefix without dedup and
    compute the distinct tokens only with it; shuffled arrivals lose little either way."""
    from scripts.lab import sim_prefill_dedup as sim

    shape = {"groups": 8, "per_group": 8, "system": 1024, "question": 64, "chunk": 4096}
    burst_off, burst_on = (sim.simulate(d, ordered=True, **shape) for d in (False, True))
    assert burst_on["prefill_tokens"] == burst_on["distinct_tokens"] < burst_off["prefill_tokens"] / 2
    shuffled_on = sim.simulate(True, ordered=False, **shape)
    assert shuffled_on["prefill_tokens"] < 1.2 * shuffled_on["distinct_tokens"]
