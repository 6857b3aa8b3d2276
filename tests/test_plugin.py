"""The plugin registers through SGLang's own registries and is found through the entry point."""

from importlib.metadata import entry_points

from packinfer_sglang.patches import batch_order, forward_batch
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang.srt.mem_cache.registry import registered_radix_cache_backends
from sglang.srt.plugins.hook_registry import HookRegistry
from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

from packinfer_sglang.serving import plugin


def test_entry_point_is_installed():
    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("packinfer") == "packinfer_sglang.serving.plugin:register"


def test_register_is_idempotent_and_complete():
    plugin.register()
    plugin.register()
    assert "packinfer" in ATTENTION_BACKENDS and ATTENTION_BACKEND_CHOICES.count("packinfer") == 1
    assert "packinfer" in registered_radix_cache_backends()
    for target in (forward_batch.TARGET, batch_order.TARGET):
        assert len(HookRegistry._hooks[target]) == 1


def test_server_args_accept_packinfer():
    import argparse

    from sglang.srt.server_args import ServerArgs

    plugin.register()
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(["--model-path", "x", "--attention-backend", "packinfer",
                              "--radix-cache-backend", "packinfer"])
    assert args.attention_backend == "packinfer" and args.radix_cache_backend == "packinfer"


def test_permute_batch_rejects_non_permutations():
    import types

    import pytest

    batch = types.SimpleNamespace(reqs=[1, 2, 3])
    with pytest.raises(ValueError, match="not a permutation"):
        batch_order.permute_batch(batch, [0, 0, 1])


def test_prefill_dedup_hook_is_registered_only_when_asked(tmp_path):
    """``PACKINFER_PREFILL_DEDUP=1`` wraps ``Scheduler.get_new_batch_prefill`` (in a fresh process:
    the config is read once per process)."""
    import os
    import subprocess
    import sys

    code = ("from sglang.srt.plugins.hook_registry import HookRegistry\n"
            "from packinfer_sglang.serving import plugin\n"
            "from packinfer_sglang.patches import prefill_dedup\n"
            "plugin.register()\n"
            "print(len(HookRegistry._hooks.get(prefill_dedup.TARGET, [])))\n")
    for value, want in (("1", "1"), ("0", "0")):
        env = {**os.environ, "PACKINFER_PREFILL_DEDUP": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                             check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == want
