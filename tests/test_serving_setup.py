"""Start-up choices of the serving glue, on CPU: the prefill backend beside packed decode, and the
decode CUDA-graph range (SGLang's objects faked where they need a GPU)."""

import logging
from types import SimpleNamespace

import pytest
from packinfer_sglang.patches import graph_capture

from packinfer_sglang.serving import backend as backend_module


def _runner(prefill="packinfer", decode="packinfer"):
    return SimpleNamespace(server_args=SimpleNamespace(get_attention_backends=lambda: (prefill, decode)))


def test_prefill_backend_choice(caplog):
    """An explicit --prefill-attention-backend is SGLang's to compose; ``triton`` keeps the packinfer
    backend's own extend; ``auto`` falls back to it with one warning where FlashInfer cannot be built
    (here: a fake model runner); ``flashinfer`` then fails at start, naming the setting."""
    assert backend_module._prefill_backend(_runner(prefill="flashinfer"), "auto") is None
    assert backend_module._prefill_backend(_runner(), "triton") is None
    caplog.set_level(logging.WARNING)
    assert backend_module._prefill_backend(_runner(), "auto") is None
    assert "FlashInfer unavailable for extend" in caplog.text
    with pytest.raises(RuntimeError, match="PACKINFER_PREFILL_BACKEND=flashinfer"):
        backend_module._prefill_backend(_runner(), "flashinfer")


class _Decode(SimpleNamespace):
    pass


def _server_args(max_bs, bs, decode_backend="packinfer"):
    """The parts of ``ServerArgs`` the hook reads, with SGLang's own capture-size generator."""
    from sglang.srt.server_args import ServerArgs

    args = SimpleNamespace(cuda_graph_config=SimpleNamespace(decode=_Decode(max_bs=max_bs, bs=bs)),
                           get_attention_backends=lambda: ("packinfer", decode_backend),
                           disable_cuda_graph_padding=False, speculative_algorithm=None)
    args._generate_decode_cuda_graph_batch_sizes = lambda m: ServerArgs._generate_decode_cuda_graph_batch_sizes(
        args, m)
    return args


def _sglang_default(default):
    """Stands for ``_handle_gpu_memory_settings``: fills the decode range SGLang would pick."""
    def original(args, gpu_mem):
        decode = args.cuda_graph_config.decode
        if decode.max_bs is None:
            decode.max_bs = default
        if decode.bs is None:
            decode.bs = args._generate_decode_cuda_graph_batch_sizes(decode.max_bs)
        return "done"
    return original


@pytest.mark.parametrize("default, user, decode_backend, want", [
    (256, None, "packinfer", 512),  # H100/H200 default raised; SGLang's sizes up to 512
    (160, None, "packinfer", 160),  # a GPU with less memory: SGLang's choice kept
    (512, None, "packinfer", 512),
    (256, 128, "packinfer", 128),  # the user's --cuda-graph-max-bs wins
    (256, None, "flashinfer", 256),  # another decode backend: untouched
])
def test_decode_graph_range(default, user, decode_backend, want):
    args = _server_args(user, None, decode_backend)
    assert graph_capture.raise_decode_graph_range(_sglang_default(default), args, 141_000) == "done"
    decode = args.cuda_graph_config.decode
    assert decode.max_bs == want and max(decode.bs) == want
    if want == 512 and default == 256:
        assert {256, 272, 496, 512} <= set(decode.bs)
