"""The tiny CPU training settings of the ablation, study and cluster tests (seconds per row on the synthetic head).
The evaluation's pose correction of unseen frames takes 10 steps, not 150: at 150 it was 95 % of a row's time."""
TINY = dict(preset="custom", face_iters=30, mouth_iters=10, fused_iters=4, face_points=300, mouth_points=60,
            sh_degree=1, densify_until=0.0, lpips_gamma=0.0, backend="torch", pose_refine=False, warmup_frac=0.15,
            test_pose_steps=10)
TINY_FLAG = ",".join(f"{k}={v}" for k, v in TINY.items())   # the same as the CLI's --config
