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
