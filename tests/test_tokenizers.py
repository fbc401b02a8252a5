"""Tokenizers against reference computations: timm's patch_embed, MAE / VideoMAE tables, brute-force KNN, open3d FPS."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pathway.errors import OptionError
from pathway.tokenizers.base import Tokenizer, TokenizerOutput
from pathway.tokenizers.image_patch import ImagePatchTokenizer
from pathway.tokenizers.patch import PatchTokenizer, patchify
from pathway.tokenizers.point_group import PointGroupTokenizer, farthest_point_sample, knn
from pathway.tokenizers.pos_embed import resample_pos_embed, sincos_pos_embed, sinusoid_table


def mae_2d_sincos(dim: int, gh: int, gw: int) -> np.ndarray:
    """MAE's util/pos_embed.py get_2d_sincos_pos_embed, written out with numpy."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape(2, 1, gh, gw)
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def test_image_tokens_match_timm_patch_embed():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=0)
    tok = ImagePatchTokenizer(img_size=32, patch_size=8, embed_dim=vit.embed_dim)
    tok.proj.load_state_dict(vit.patch_embed.proj.state_dict())
    tok.pos_embed.data.copy_(vit.pos_embed[:, 1:])
    x = torch.randn(2, 3, 32, 32)
    out = tok.encode(x)
    assert isinstance(tok, Tokenizer) and isinstance(out, TokenizerOutput)
    torch.testing.assert_close(out.tokens, vit.patch_embed(x) + vit.pos_embed[:, 1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(tok(x), out.tokens)
    assert out.pos.shape == (1, 16, vit.embed_dim)


def test_image_pos_embed_interpolates_like_timm():
    pytest.importorskip("timm")
    from timm.layers import resample_abs_pos_embed

    tok = ImagePatchTokenizer(img_size=32, patch_size=8, embed_dim=16)
    out = tok.encode(torch.randn(1, 3, 48, 40))
    assert out.tokens.shape == (1, 30, 16)
    ref = resample_abs_pos_embed(tok.pos_embed, [6, 5], [4, 4], num_prefix_tokens=0)
    torch.testing.assert_close(out.pos, ref, rtol=0, atol=1e-6)


def test_image_targets_are_mae_patchify():
    tok = ImagePatchTokenizer(img_size=32, patch_size=8, embed_dim=16)
    x = torch.randn(2, 3, 32, 32)
    ref = torch.einsum("nchpwq->nhwpqc", x.reshape(2, 3, 4, 8, 4, 8)).reshape(2, 16, 8 * 8 * 3)
    torch.testing.assert_close(tok.reconstruction_targets(x, tok.encode(x)), ref, rtol=0, atol=0)
    assert tok.reconstruction_loss == "mse"


def test_sincos_pos_embed_matches_mae():
    ref = mae_2d_sincos(32, 3, 5)
    torch.testing.assert_close(sincos_pos_embed((3, 5), 32)[0], torch.from_numpy(ref).float(), rtol=0, atol=1e-6)
    tok = ImagePatchTokenizer(img_size=(24, 40), patch_size=8, embed_dim=32, pos_embed="sincos")
    assert not tok.pos_embed.requires_grad
    torch.testing.assert_close(tok.pos_embed[0], torch.from_numpy(ref).float(), rtol=0, atol=1e-6)
    # a fixed table is recomputed exactly for another grid, not interpolated
    out = tok.encode(torch.randn(1, 3, 16, 16))
    torch.testing.assert_close(out.pos[0], torch.from_numpy(mae_2d_sincos(32, 2, 2)).float(), rtol=0, atol=1e-6)


def test_videomae_sinusoid_table():
    n, d = 7, 12
    ref = np.array([[p / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for p in range(n)])
    ref[:, 0::2], ref[:, 1::2] = np.sin(ref[:, 0::2]), np.cos(ref[:, 1::2])
    torch.testing.assert_close(sinusoid_table(n, d)[0], torch.from_numpy(ref).float(), rtol=0, atol=1e-6)


def test_resample_pos_embed_identity_and_errors():
    pos = torch.randn(1, 12, 8)
    assert resample_pos_embed(pos, (3, 4), (3, 4)) is pos
    assert resample_pos_embed(pos, (3, 4), (6, 8)).shape == (1, 48, 8)
    assert resample_pos_embed(torch.randn(1, 24, 8), (2, 3, 4), (4, 3, 4)).shape == (1, 48, 8)
    with pytest.raises(ValueError, match="grid"):
        resample_pos_embed(pos, (3, 5), (3, 4))


def test_patch_tokenizer_shape_errors_name_the_fix():
    tok = ImagePatchTokenizer(img_size=32, patch_size=8, embed_dim=16)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tok(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        tok(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="pos_embed"):
        ImagePatchTokenizer(img_size=32, patch_size=8, embed_dim=16, pos_embed="rope")


def test_patchify_1d_and_3d_layouts():
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8)
    t = patchify(x, (4,))
    torch.testing.assert_close(t[0, 1], x[0, :, 4:8].T.reshape(-1))  # (position, channel) order
    v = torch.randn(1, 3, 4, 8, 8)
    t = patchify(v, (2, 4, 4))
    assert t.shape == (1, 2 * 2 * 2, 2 * 4 * 4 * 3)
    torch.testing.assert_close(t[0, 0], v[0, :, :2, :4, :4].permute(1, 2, 3, 0).reshape(-1))
    tok = PatchTokenizer((16,), (4,), in_chans=3, embed_dim=8, pos_embed="sincos")
    assert tok(torch.randn(2, 3, 16)).shape == (2, 4, 8)


# ---------------------------------------------------------------- point groups


def cloud(b: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, 3, generator=g) * torch.tensor([2.0, 1.0, 0.5])


def covering_radius(points: np.ndarray, centres: np.ndarray) -> float:
    d = ((points[:, None] - centres[None]) ** 2).sum(-1)
    return float(np.sqrt(d.min(1).max()))


def test_fps_matches_naive_loop_and_is_deterministic():
    xyz = cloud(3, 200)
    idx = farthest_point_sample(xyz, 16, start=0)
    for b in range(3):
        chosen, dist = [0], ((xyz[b] - xyz[b, 0]) ** 2).sum(-1)
        for _ in range(15):
            nxt = int(dist.argmax())
            chosen.append(nxt)
            dist = torch.minimum(dist, ((xyz[b] - xyz[b, nxt]) ** 2).sum(-1))
        assert idx[b].tolist() == chosen
    assert torch.equal(idx, farthest_point_sample(xyz, 16, start=0))
    assert farthest_point_sample(xyz, 16, start=None).shape == (3, 16)


def test_fps_covers_as_well_as_open3d():
    o3d = pytest.importorskip("open3d")
    xyz = cloud(1, 512, seed=1)[0]
    ours = xyz[farthest_point_sample(xyz[None], 64)[0]].numpy()
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz.double().numpy()))
    theirs = np.asarray(pc.farthest_point_down_sample(64).points)
    r_ours, r_theirs = covering_radius(xyz.numpy(), ours), covering_radius(xyz.numpy(), theirs)
    # same greedy algorithm; start points differ, so the radii agree only approximately
    assert r_ours <= 1.15 * r_theirs
    random = xyz[torch.randperm(512, generator=torch.Generator().manual_seed(0))[:64]].numpy()
    assert r_ours < covering_radius(xyz.numpy(), random)


def test_knn_matches_brute_force():
    ref, query = cloud(2, 300, seed=2), cloud(2, 40, seed=3)
    d2, idx = knn(query, ref, 8)
    brute = torch.cdist(query.double(), ref.double())
    top = brute.topk(8, dim=2, largest=False)
    torch.testing.assert_close(d2.double().sqrt(), top.values, rtol=0, atol=1e-5)
    torch.testing.assert_close(brute.gather(2, idx), top.values, rtol=0, atol=1e-5)  # same sets up to ties


def fps_then_knn(xyz: torch.Tensor, num_samples: int, k: int, backend: str, device: str = "cpu"):
    """Centre indices, then the squared distances and indices of each centre's ``k`` nearest points."""
    xyz = xyz.to(device)
    idx = farthest_point_sample(xyz, num_samples, backend=backend)
    centres = xyz.gather(1, idx[..., None].expand(-1, -1, 3))
    return (idx, *knn(centres, xyz, k, backend=backend))


def grouping_cases() -> list[tuple[torch.Tensor, int, int]]:
    """(cloud, centres, neighbours): random clouds of several sizes, duplicate points (exact ties), N = G = K."""
    twice = cloud(2, 40, seed=5)
    duplicates = torch.cat([twice, twice, twice[:, :8]], dim=1)  # 88 points, 40 of them three times
    return [(cloud(2, 300, seed=4), 24, 8), (cloud(1, 1000, seed=6), 12, 16), (duplicates, 48, 8),
            (cloud(1, 16, seed=7), 16, 16)]


def check_triton_matches_reference(device: str, cases: list[tuple[torch.Tensor, int, int]]) -> None:
    """The Triton kernels give the torch reference's indices and distances, bit for bit (run by the tests below)."""
    for xyz, num_samples, k in cases:
        ref = fps_then_knn(xyz, num_samples, k, "torch")
        ours = fps_then_knn(xyz, num_samples, k, "triton", device)
        for a, b in zip(ref, ours):
            assert torch.equal(a, b.cpu()), (tuple(xyz.shape), num_samples, k)


def test_fps_backends_give_the_reference_indices():
    pytest.importorskip("numba")
    for xyz, num_samples, k in grouping_cases():
        ref = fps_then_knn(xyz, num_samples, k, "torch")
        assert all(torch.equal(a, b) for a, b in zip(ref, fps_then_knn(xyz, num_samples, k, "numba")))
        torch.manual_seed(3)
        random_start = farthest_point_sample(xyz, num_samples, start=None, backend="torch")
        torch.manual_seed(3)
        assert torch.equal(random_start, farthest_point_sample(xyz, num_samples, start=None, backend="numba"))
    # exact ties go to the lowest index: a point's two copies are 0 apart, the earlier copy comes first
    dup = grouping_cases()[2][0]
    _, idx = knn(dup[:, :2], dup, 3)
    assert idx[0].tolist() == [[0, 40, 80], [1, 41, 81]]
    with pytest.raises(OptionError, match="backend='cuda' is not one of"):
        farthest_point_sample(dup, 4, backend="cuda")
    with pytest.raises(ValueError, match="start=88 is not an index"):
        farthest_point_sample(dup, 4, start=88)


def test_numba_skipping_leaves_keeps_the_reference_indices():
    """The leaf skipping of ``point_numba``'s FPS and KNN on clouds that stress its bound: far from the origin,
    tiny and huge scales, distances that overflow float32, degenerate boxes (a line, one point repeated), exact
    ties across leaves (a shuffled grid, repeated clouds), tight clusters, and leaves of 32, 64 and 128 points.
    KNN is checked from the FPS centres (k = 32 and k = N) and from queries off the cloud (k = 3, as
    ``interpolate_to_points`` asks)."""
    pytest.importorskip("numba")
    g = torch.Generator().manual_seed(11)
    grid = torch.stack(torch.meshgrid(*[torch.arange(12.0)] * 3, indexing="ij"), -1).reshape(1, -1, 3)
    line = torch.zeros(1, 2000, 3)
    line[..., 0] = torch.rand(2000, generator=g)
    clusters = torch.randn(1, 6000, 3, generator=g) * 0.01 + torch.randint(5, (1, 6000, 1), generator=g)
    cases = [
        (torch.nn.functional.normalize(torch.randn(2, 8192, 3, generator=g), dim=-1), 1024),  # leaves of 64
        (torch.rand(1, 17000, 3, generator=g), 300),  # leaves of 128
        (torch.rand(1, 4000, 3, generator=g) + 1e4, 500),
        (torch.rand(1, 3000, 3, generator=g) * 1e-20, 300),
        (torch.rand(1, 3000, 3, generator=g) * 3e38, 300),  # squared distances overflow to inf
        (torch.ones(1, 500, 3), 500),
        (line, 400),
        (grid[:, torch.randperm(grid.shape[1], generator=g)], 1728),
        (torch.rand(1, 1000, 3, generator=g).repeat(1, 5, 1), 1000),
        (clusters, 600),
    ]
    for xyz, num_samples in cases:
        for start in (0, xyz.shape[1] - 1):
            ref = farthest_point_sample(xyz, num_samples, start=start, backend="torch")
            assert torch.equal(ref, farthest_point_sample(xyz, num_samples, start=start, backend="numba")), (
                tuple(xyz.shape), num_samples, start)
        centres = xyz.gather(1, ref[..., None].expand(-1, -1, 3))
        off_cloud = centres[:, :50] + 0.37 * (centres[:, 50:100] - centres[:, :50])
        for query, k in ((centres, min(32, xyz.shape[1])), (centres[:, :3], xyz.shape[1]), (off_cloud, 3)):
            ours = knn(query, xyz, k, backend="numba")
            assert all(torch.equal(a, b) for a, b in zip(knn(query, xyz, k, backend="torch"), ours)), (
                tuple(xyz.shape), tuple(query.shape), k)
        assert (knn(centres, xyz, 1)[0] == 0).all()  # each centre is its own nearest point, even at 3e38


class _SampledClouds(torch.utils.data.Dataset):
    """Each item samples a batch of clouds with numba's FPS: what a loader that groups points does."""

    def __init__(self, xyz: torch.Tensor) -> None:
        self.xyz = xyz

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> torch.Tensor:
        return farthest_point_sample(self.xyz, 64, backend="numba")


def test_numba_fps_thread_pool_survives_fork(monkeypatch):
    """A DataLoader worker forked after the parent sampled in threads gets its own pool (a copied one has none)."""
    pytest.importorskip("numba")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # two workers even in the loader's one-thread child
    xyz = cloud(8, 2048, seed=12)
    parent = farthest_point_sample(xyz, 64, backend="numba")  # 8 x 2048 x 64: enough work for the pool
    loader = torch.utils.data.DataLoader(_SampledClouds(xyz), batch_size=None, num_workers=1,
                                         multiprocessing_context="fork", timeout=60)
    assert torch.equal(next(iter(loader)), parent)


def test_point_grouping_refuses_non_finite_points_on_every_backend():
    """NaN or inf coordinates are named, not grouped: the torch loop used to return index 0 again and again."""
    xyz = cloud(2, 64, seed=13)
    xyz[1, 17, 2] = float("nan")
    query = cloud(2, 4, seed=14)
    query[0, 2, 0] = float("inf")
    backends = ["torch"] + (["numba"] if importlib.util.find_spec("numba") else [])
    for backend in backends:
        with pytest.raises(ValueError, match=r"cloud has NaN or infinite coordinates \(first at batch 1, point 17\)"):
            farthest_point_sample(xyz, 8, backend=backend)
        with pytest.raises(ValueError, match="the cloud has NaN"):
            knn(query, xyz, 4, backend=backend)
        bad_query = r"a query point has NaN or infinite coordinates \(first at batch 0, point 2\)"
        with pytest.raises(ValueError, match=bad_query):
            knn(query, cloud(2, 64), 4, backend=backend)
        # an empty batch is an empty result, as for the other tokenizers' ops
        d, idx = knn(cloud(0, 4), cloud(0, 64), 3, backend=backend)
        assert d.shape == idx.shape == (0, 4, 3)
    with pytest.raises(ValueError, match="point 17"):
        PointGroupTokenizer(num_groups=8, group_size=4, embed_dim=16).encode(xyz)


def test_triton_kernels_match_reference_in_interpreter():
    """Triton's interpreter runs the kernels on CPU tensors; switched on before triton is imported: a subprocess."""
    pytest.importorskip("triton")
    code = ("import sys; sys.path.insert(0, 'tests'); import test_tokenizers as t; "
            "t.check_triton_matches_reference('cpu', t.grouping_cases())")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_triton_kernels_refuse_cpu_tensors_without_interpreter():
    point_kernels = pytest.importorskip("pathway.tokenizers.point_kernels")
    if point_kernels._INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1: the kernels run on CPU tensors")
    with pytest.raises(point_kernels.PointKernelError, match="TRITON_INTERPRET=1"):
        farthest_point_sample(cloud(1, 16), 4, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernels_match_reference_on_cuda():
    pytest.importorskip("triton")
    large = [(cloud(4, 8192, seed=8), 1024, 32), (cloud(16, 2048, seed=9), 128, 32), (cloud(3, 5000, seed=10), 500, 20)]
    check_triton_matches_reference("cuda", grouping_cases() + large)
    assert farthest_point_sample(cloud(2, 512).cuda(), 8).device.type == "cuda"  # auto takes the kernel on CUDA


def test_point_group_tokenizer_outputs():
    tok = PointGroupTokenizer(num_groups=16, group_size=8, in_chans=6, embed_dim=32).eval()
    pts = torch.cat([cloud(2, 256), torch.randn(2, 256, 3)], dim=-1)
    out = tok.encode(pts)
    assert out.tokens.shape == (2, 16, 32) and out.pos.shape == (2, 16, 32)
    assert tok.reconstruction_targets(pts, out).shape == (2, 16, 8 * 3) and tok.reconstruction_loss == "chamfer"
    centers, nbr = out.extras["centers"], out.extras["neighbours"]
    assert centers.shape == (2, 16, 3) and nbr.shape == (2, 16, 8)
    # targets are each group's xyz relative to its centre; the centre is its own nearest neighbour
    b, g = 1, 5
    targets = tok.reconstruction_targets(pts, out)
    torch.testing.assert_close(targets[b, g].reshape(8, 3), pts[b, nbr[b, g], :3] - centers[b, g])
    torch.testing.assert_close(targets[b, g, :3], torch.zeros(3))
    # parameter names follow Point-MAE's encoder so its checkpoints load by renaming
    assert set(tok.state_dict()) >= {"first_conv.0.weight", "first_conv.3.weight", "second_conv.0.weight",
                                     "second_conv.3.weight", "pos_embed.0.weight", "pos_embed.2.weight"}
    assert tok.first_conv[0].weight.shape == (128, 6, 1) and tok.second_conv[3].weight.shape == (32, 512, 1)


def test_point_group_tokenizer_backward_and_errors():
    tok = PointGroupTokenizer(num_groups=8, group_size=4, embed_dim=16)
    pts = cloud(2, 64).requires_grad_(True)
    tok(pts).sum().backward()
    assert pts.grad is not None and tok.first_conv[0].weight.grad is not None
    with pytest.raises(ValueError, match="resample the cloud with replacement"):
        tok(cloud(1, 6))
    with pytest.raises(ValueError, match=r"points \[B, N, 3\]"):
        tok(torch.randn(1, 64, 6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_point_groups_same_on_cuda():
    tok = PointGroupTokenizer(num_groups=16, group_size=8, embed_dim=16).eval()
    pts = cloud(2, 256)
    cpu = tok.encode(pts)
    gpu = tok.cuda().encode(pts.cuda())
    assert torch.equal(cpu.extras["neighbours"], gpu.extras["neighbours"].cpu())
    torch.testing.assert_close(cpu.tokens, gpu.tokens.cpu(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- video and audio patches


def test_video_tubelets_match_videomae_layout():
    from pathway.tokenizers.video_tubelet import VideoTubeletTokenizer

    tok = VideoTubeletTokenizer(num_frames=4, img_size=32, tubelet_size=2, patch_size=16, embed_dim=24)
    assert tok.proj.weight.shape == (24, 3, 2, 16, 16)  # VideoMAE's Conv3d
    x = torch.randn(2, 3, 4, 32, 32)
    out = tok.encode(x)
    # VideoMAE: proj(x).flatten(2).transpose(1, 2) + the sinusoid table of 2*2*2 positions
    ref = tok.proj(x).flatten(2).transpose(1, 2) + sinusoid_table(8, 24)
    torch.testing.assert_close(out.tokens, ref, rtol=0, atol=1e-6)
    assert tok.reconstruction_targets(x, out).shape == (2, 8, 2 * 16 * 16 * 3) and not tok.pos_embed.requires_grad
    assert tok.encode(torch.randn(1, 3, 8, 32, 32)).pos.shape == (1, 16, 24)  # more frames: table recomputed


def test_audio_patches_match_audiomae_layout():
    from pathway.tokenizers.audio_spectrogram import AudioSpectrogramTokenizer

    tok = AudioSpectrogramTokenizer(num_frames=64, num_mel_bins=32, patch_size=16, embed_dim=16)
    assert tok.proj.weight.shape == (16, 1, 16, 16)
    spec = torch.randn(2, 64, 32)
    out = tok.encode(spec)
    ref = tok.proj(spec.unsqueeze(1)).flatten(2).transpose(1, 2) + torch.from_numpy(mae_2d_sincos(16, 4, 2)).float()
    torch.testing.assert_close(out.tokens, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(tok(spec.unsqueeze(1)), out.tokens)
    assert tok.reconstruction_targets(spec, out).shape == (2, 8, 256)
