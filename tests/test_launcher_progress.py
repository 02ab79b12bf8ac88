"""While Triton loads its models the launcher logs which have loaded, from Triton's log: its gRPC port opens only
once every model has, so nothing else can say."""

from __future__ import annotations

from pathlib import Path

from serving.triton.launcher import TritonServer
from serving.triton.ports import Ports


def test_model_load_progress_comes_from_tritons_log(tmp_path: Path) -> None:
    for model in ("omnigen2", "vae_decoder", "mllm"):
        (tmp_path / "repository" / model).mkdir(parents=True)
        (tmp_path / "repository" / model / "config.pbtxt").touch()
    server = TritonServer(tmp_path / "repository", Ports(1, 2, 3), log_path=tmp_path / "tritonserver.log")
    assert server.load_progress() == "0 of 3 loaded (none); waiting for mllm, omnigen2, vae_decoder"
    (tmp_path / "tritonserver.log").write_text(
        'I1126 model_lifecycle.cc:472] "loading: vae_decoder:1"\n'
        "I1126 model_lifecycle.cc:839] \"successfully loaded 'vae_decoder'\"\n"
        "I1126 model_lifecycle.cc:839] \"successfully loaded 'mllm'\"\n"
    )
    assert server.load_progress() == "2 of 3 loaded (mllm, vae_decoder); waiting for omnigen2"
