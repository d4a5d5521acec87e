"""`train(..., parallel=True)`: the face and mouth branches in two processes (two GPUs on a real machine; here two
CPU processes) give the same model as training them one after the other."""
import pytest
import torch

from talkinggs.train import train, cpu_demo_train_config
from talkinggs.model import load_head

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parallel_branches_match_sequential(clip64_once, tmp_path):
    clip = clip64_once                        # the synthetic head at 64x64, preprocessed once per session: read only
    cfg = cpu_demo_train_config(face_iters=30, mouth_iters=10, fused_iters=4, face_points=300, mouth_points=60,
                                ckpt_every=10, log_every=5)
    seq = train(clip, tmp_path / "seq", cfg, device="cpu", progress=False)
    par = train(clip, tmp_path / "par", cfg, device="cpu", parallel=True, devices=("cpu", "cpu"), progress=False)
    assert (tmp_path / "par" / "model.pt").exists()
    back = load_head(tmp_path / "par" / "model.pt")
    for b in ("face", "mouth"):
        s, p = seq.branch(b).splats, back.branch(b).splats
        assert s["means"].shape == p["means"].shape, b
        for k in s.keys():
            assert torch.allclose(s[k].detach(), p[k], atol=1e-5), (b, k)
