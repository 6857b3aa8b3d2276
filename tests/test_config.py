import pytest

from packinfer_sglang.config import PackInferConfig, config_from_env


def test_defaults():
    assert config_from_env({}) == PackInferConfig()


def test_env_overrides():
    cfg = config_from_env({"PACKINFER_VERIFY": "1", "PACKINFER_MIN_PREFIX_TOKENS": "17",
                           "PACKINFER_VERIFY_RTOL": "0.05", "PACKINFER_REORDER_BATCH": "off"})
    assert (cfg.verify, cfg.min_prefix_tokens, cfg.verify_rtol, cfg.reorder_batch) == (True, 17, 0.05, False)


@pytest.mark.parametrize("env, match", [
    ({"PACKINFER_VERIFY": "maybe"}, "PACKINFER_VERIFY"),
    ({"PACKINFER_MIN_PREFIX_TOKENS": "x"}, "expected int"),
    ({"PACKINFER_MIN_GROUP_SIZE": "1"}, "min_group_size"),
    ({"PACKINFER_VERIFY_RTOL": "2"}, "verify_rtol"),
])
def test_bad_values_raise(env, match):
    with pytest.raises(ValueError, match=match):
        config_from_env(env)


@pytest.mark.parametrize("env, place", [
    ({}, False),  # placement follows compaction, which is off
    ({"PACKINFER_COMPACT": "1"}, True),
    ({"PACKINFER_COMPACT": "1", "PACKINFER_COMPACT_PLACE": "0"}, False),
    ({"PACKINFER_COMPACT_PLACE": "1"}, False),
])
def test_placement_follows_compaction(env, place):
    assert config_from_env(env).place is place


def test_placement_refresh_period_must_be_positive():
    assert config_from_env({"PACKINFER_COMPACT_PLACE_EVERY": "3"}).compact_place_every == 3
    with pytest.raises(ValueError, match="compact_place_every must be >= 1"):
        config_from_env({"PACKINFER_COMPACT_PLACE_EVERY": "0"})


def test_fragmentation_log_period():
    assert PackInferConfig().frag_log_every == 0  # off unless asked for
    assert config_from_env({"PACKINFER_FRAG_LOG_EVERY": "50"}).frag_log_every == 50
    with pytest.raises(ValueError, match="frag_log_every must be >= 0"):
        config_from_env({"PACKINFER_FRAG_LOG_EVERY": "-1"})


def test_graph_launch():
    assert PackInferConfig().graph_launch == "flat"
    assert config_from_env({"PACKINFER_GRAPH_LAUNCH": "persistent"}).graph_launch == "persistent"
    with pytest.raises(ValueError, match="graph_launch must be 'flat' or 'persistent'"):
        config_from_env({"PACKINFER_GRAPH_LAUNCH": "tiled"})
