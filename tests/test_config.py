"""Settings: defaults, overrides, and a one-line error naming the variable for every bad value."""

import subprocess
import sys

import pytest

from packinfer_sglang.config import ConfigError, PackInferConfig, config_from_env


def test_defaults():
    assert config_from_env({}) == PackInferConfig()


def test_env_overrides():
    cfg = config_from_env({"PACKINFER_VERIFY": "1", "PACKINFER_MIN_PREFIX_TOKENS": "17",
                           "PACKINFER_VERIFY_RTOL": "0.05", "PACKINFER_REORDER_BATCH": "off"})
    assert (cfg.verify, cfg.min_prefix_tokens, cfg.verify_rtol, cfg.reorder_batch) == (True, 17, 0.05, False)


@pytest.mark.parametrize("env, message", [
    ({"PACKINFER_VERIFY": "maybe"}, "PACKINFER_VERIFY='maybe': expected one of 0/1/true/false/yes/no/on/off"),
    ({"PACKINFER_MIN_PREFIX_TOKENS": "x"}, "PACKINFER_MIN_PREFIX_TOKENS='x': expected an integer"),
    ({"PACKINFER_MIN_PREFIX_TOKENS": "-5"}, "PACKINFER_MIN_PREFIX_TOKENS=-5: must be >= 1"),
    ({"PACKINFER_MIN_GROUP_SIZE": "1"}, "PACKINFER_MIN_GROUP_SIZE=1: must be >= 2"),
    ({"PACKINFER_VERIFY_RTOL": "2"}, "PACKINFER_VERIFY_RTOL=2.0: must be in (0, 1)"),
    ({"PACKINFER_VERIFY_RTOL": "nan"}, "PACKINFER_VERIFY_RTOL='nan': expected a finite number"),
    ({"PACKINFER_COMPACT_MIN_GAIN": "0"}, "PACKINFER_COMPACT_MIN_GAIN=0.0: must be > 0"),
    ({"PACKINFER_COMPACT_PLACE_EVERY": "0"}, "PACKINFER_COMPACT_PLACE_EVERY=0: must be >= 1"),
    ({"PACKINFER_FRAG_LOG_EVERY": "-1"}, "PACKINFER_FRAG_LOG_EVERY=-1: must be >= 0"),
])
def test_bad_values_raise_one_line_naming_the_variable(env, message):
    with pytest.raises(ConfigError) as e:
        config_from_env(env)
    assert str(e.value) == message


def test_unknown_variables_are_errors():
    """A typo or a removed setting (``PACKINFER_GRAPH_LAUNCH``: the persistent launch lost) fails,
    rather than being silently ignored."""
    for name in ("PACKINFER_GRAPH_LAUNCH", "PACKINFER_MIN_PREFIX"):
        with pytest.raises(ConfigError, match=f"^{name}='x': not a packinfer setting"):
            config_from_env({name: "x", "OTHER": "1"})


@pytest.mark.parametrize("env, place", [
    ({}, False),  # placement follows compaction, which is off
    ({"PACKINFER_COMPACT": "1"}, True),
    ({"PACKINFER_COMPACT": "1", "PACKINFER_COMPACT_PLACE": "0"}, False),
    ({"PACKINFER_COMPACT_PLACE": "1"}, False),
])
def test_placement_follows_compaction(env, place):
    assert config_from_env(env).place is place


def test_fragmentation_log_period():
    assert PackInferConfig().frag_log_every == 0  # off unless asked for
    assert config_from_env({"PACKINFER_FRAG_LOG_EVERY": "50"}).frag_log_every == 50


def _packinfer(*args, env=None):
    code = "import sys; from packinfer_sglang.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_fails_fast_with_one_line(monkeypatch):
    """``packinfer demo`` and ``serve`` validate every setting before anything starts: exit code 2,
    one line on stderr naming the variable or flag."""
    import os

    env = {**os.environ, "PACKINFER_MIN_PREFIX_TOKENS": "abc"}
    for args in (["demo"], ["serve", "--", "--model-path", "x"]):
        r = _packinfer(*args, env=env)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == "packinfer: PACKINFER_MIN_PREFIX_TOKENS='abc': expected an integer"
    r = _packinfer("serve", "--min-prefix-tokens", "-5", "--", "--model-path", "x")
    assert r.returncode == 2 and "argument --min-prefix-tokens: must be >= 1, got -5" in r.stderr
    r = _packinfer("demo", "--num-kv-heads", "3")
    assert r.returncode == 2 and r.stderr.strip() == (
        "packinfer: --num-qo-heads 8 must be a multiple of --num-kv-heads 3")
    r = _packinfer("demo", "--groups", "0")
    assert r.returncode == 2 and "argument --groups: must be >= 1, got 0" in r.stderr


def test_cli_version_and_demo_head_dims():
    from packinfer_sglang.kernels.checks import SUPPORTED_HEAD_DIMS

    from packinfer_sglang import __version__
    from packinfer_sglang.cli import DEMO_HEAD_DIMS

    r = _packinfer("--version")
    assert r.returncode == 0 and r.stdout.startswith(f"packinfer-sglang {__version__} (sglang ")
    assert DEMO_HEAD_DIMS == SUPPORTED_HEAD_DIMS


def test_serve_without_a_gpu_says_so_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    r = _packinfer("serve", "--", "--model-path", "x")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "needs a CUDA GPU" in r.stderr


def test_plugin_exits_with_one_line_on_a_bad_setting():
    """``python -m sglang.launch_server`` loads the plugin in each process: a bad setting ends it with
    exit code 2 rather than SGLang's logged "Failed to execute general plugin" and a start anyway."""
    import os

    code = ("import packinfer_sglang.serving.plugin as p, packinfer_sglang.config as c; "
            "c.get_config.cache_clear(); p.register()")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PACKINFER_VERIFY": "maybe"})
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "packinfer: PACKINFER_VERIFY='maybe': expected one of 0/1/true/false/yes/no/on/off")
