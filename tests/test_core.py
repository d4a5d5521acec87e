"""Conventions of talkinggs.core: OpenCV look-at, world-to-camera viewmats, wxyz quaternions, intrinsics."""
import math
import torch
import torch.nn.functional as F
from talkinggs.core import (look_at, orbit_viewmats, camera_centers, intrinsics_from_fov, project_points,
                            quat_to_rotmat, rotmat_to_quat)


def test_look_at_is_opencv_world_to_camera():
    eye, target = torch.tensor([1.0, 2.0, -4.0]), torch.tensor([0.5, 0.0, 0.0])
    vm = look_at(eye, target)
    R, t = vm[:3, :3], vm[:3, 3]
    assert torch.allclose(R @ R.T, torch.eye(3), atol=1e-6) and abs(torch.linalg.det(R) - 1) < 1e-6
    assert torch.allclose(R @ eye + t, torch.zeros(3), atol=1e-5)               # eye -> camera origin
    p = R @ target + t
    assert p[2] > 0 and torch.allclose(p[:2], torch.zeros(2), atol=1e-5)       # target straight ahead (+z)
    up_cam = R @ torch.tensor([0.0, 1.0, 0.0])
    assert up_cam[1] < 0                                                        # world up is image up (y down)


def test_projection_of_points_on_axes():
    vm = look_at(torch.tensor([0.0, 0.0, -2.0]), torch.zeros(3))[None]
    K = intrinsics_from_fov(90, 100, 80)[None]
    uv, z = project_points(torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), vm, K)
    assert torch.allclose(uv[0, 0], torch.tensor([50.0, 40.0]), atol=1e-4)
    # fov 90 -> f = 50 px; a point 1 unit up at depth 2 lands 25 px above the centre
    assert (torch.allclose(uv[0, 1], torch.tensor([50.0, 15.0]), atol=1e-4)
            and torch.allclose(z, torch.full((1, 2), 2.0)))


def test_orbit_and_quaternions():
    vms = orbit_viewmats(12, radius=2.0, elevation_deg=10)
    assert torch.allclose(camera_centers(vms).norm(dim=-1), torch.full((12,), 2.0), atol=1e-5)
    q = F.normalize(torch.randn(64, 4, dtype=torch.float64), dim=-1)
    assert torch.allclose(quat_to_rotmat(rotmat_to_quat(quat_to_rotmat(q))), quat_to_rotmat(q), atol=1e-10)
    # wxyz: (cos 45°, sin 45°, 0, 0) is a quarter turn about x, taking y to z
    qx = torch.tensor([math.cos(math.pi / 4), math.sin(math.pi / 4), 0.0, 0.0])
    assert torch.allclose(quat_to_rotmat(qx) @ torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)
