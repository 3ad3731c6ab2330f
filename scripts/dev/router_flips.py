"""Dev check on a GPU: why one decode step of scripts/dev/gpu_kernels_in_model.py came out far
from float32 with the expert kernels on: not a wrong kernel result but a near-tie in the next
layer's router (its 4th and 5th logits within bf16 rounding), which the kernels' and MLX's
differently rounded bf16 outputs break differently.

On the H100 (MLX 0.32.4): step 1, layer 1 — float32 gap 0.0152, the kernels run chose expert 13
where float32 and the MLX path chose 0 (logits 1.35 from float32 vs 0.057); on the same inputs
the kernels' MoE output was 2-3x closer to float32 than MLX's path at every step and layer
(e.g. 0.020 vs 0.055, 0.029 vs 0.062).

Same model, prompt and steps as that script (writes /tmp/g20_2layers if missing). For each decode
step and layer, in three runs (expert kernels on, every kernel off, float32):
  - the experts each run chose and the float32 router's gap between its 4th and 5th logit;
  - in the kernels run, on that call's own inputs: |kernels - float32| and |MLX bf16 path - float32|
    for the whole MoE block output (float32 computed on the CPU, no TF32).
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

import make_tiny_checkpoint as mtc  # noqa: E402
from gptoss_mlx import model as M  # noqa: E402
from gptoss_mlx.kernels import moe, registry  # noqa: E402
from gptoss_mlx.loading import load_model  # noqa: E402

TINY = "--tiny" in sys.argv  # a quick local smoke run of this script on the CPU
directory = Path("/tmp/tiny_2layers" if TINY else "/tmp/g20_2layers")
config = (mtc.TINY if TINY else mtc.GPT_OSS_20B).replace(
    num_hidden_layers=2, layer_types=("sliding_attention", "full_attention"))
if not directory.exists():
    mtc.write_hf(directory, config, seed=3)
prompt = [(7 * t + 1000) % (1000 if TINY else 199000) for t in range(300 if TINY else 2500)]
STEPS = 8


def f32(v):
    return v.astype(mx.float32) if isinstance(v, mx.array) and v.dtype in (mx.bfloat16, mx.float16) else v


def moe_block(mlp, x, residual, indices, weights):
    """residual + moe(x) through MLX's generic path with the given routing."""
    y = mlp.experts(x, indices)
    return moe.combine_experts(y, weights, residual)


records = {}  # run -> list of (indices, logits32, extra)
orig = M.MLP.__call__


def spy_for(run_name):
    def spy(self, x, residual):
        out = orig(self, x, residual)
        if x.shape[1] != 1:
            return out
        x2, r2 = x.reshape(1, -1), residual.reshape(1, -1)
        with mx.stream(mx.cpu):
            logits32 = f32(x2) @ f32(self.router.weight).T + f32(self.router.bias)
        indices, weights = moe.top_k_softmax(self.router(x2), self.top_k)
        extra = None
        if run_name == "kernels":
            mlx_path = moe_block(self, x2, r2, indices, weights)
            with mx.stream(mx.cpu):
                ex = self.experts
                gu, down = ex.gate_up_proj, ex.down_proj
                (act32,) = moe.gate_up_swiglu_reference(f32(x2), indices, gu.weight, gu.scales, f32(gu.bias),
                                                        ex.swiglu_limit)
                (exact,) = moe.down_combine_reference(act32, indices, f32(weights), down.weight, down.scales,
                                                      f32(down.bias), f32(r2))
            extra = (mx.abs(f32(out.reshape(1, -1)) - exact).max(), mx.abs(f32(mlx_path) - exact).max(),
                     mx.abs(exact).max())
        mx.eval(indices, logits32, extra)
        records[run_name].append((indices, logits32, extra))
        return out
    return spy


def run(name, model, kernels):
    os.environ[registry.ENV_VAR] = kernels
    registry.reset()
    records[name] = []
    M.MLP.__call__ = spy_for(name)
    cache = model.make_cache()
    for a in range(0, len(prompt), 1024):
        logits = model(mx.array([prompt[a:a + 1024]]), cache=cache)[:, -1]
    steps = [logits]
    for t in range(STEPS):
        steps.append(model(mx.array([[500 + t]]), cache=cache)[:, -1])
    out = mx.stack(steps).astype(mx.float32)
    mx.eval(out)
    M.MLP.__call__ = orig
    return out


model = load_model(directory)
logits = {"kernels": run("kernels", model, "on"), "off": run("off", model, "off")}
logits["float32"] = run("float32", load_model(directory, mx.float32), "off")
print("state of the expert kernels in the kernels run: forced on (GPTOSS_MLX_KERNELS=on)")

for step in range(1, STEPS + 1):
    err = {r: mx.abs(logits[r][step] - logits["float32"][step]).max().item() for r in ("kernels", "off")}
    print(f"step {step}: logits vs float32: kernels {err['kernels']:.4g}, MLX path {err['off']:.4g}")
    for layer in range(2):
        n = 2 * (step - 1) + layer
        row = []
        for r in ("kernels", "off", "float32"):
            indices, logits32, _ = records[r][n]
            ranked = mx.sort(logits32.reshape(-1))[::-1]
            gap = (ranked[3] - ranked[4]).item()
            row.append(f"{r}: {sorted(indices.reshape(-1).tolist())} gap4-5 {gap:.4f}")
        k_err, mlx_err, scale = (v.item() for v in records["kernels"][n][2])
        print(f"  layer {layer}: " + "; ".join(row))
        print(f"           MoE block vs float32 on the kernels run's inputs: kernels {k_err:.4g}, "
              f"MLX path {mlx_err:.4g} (output scale {scale:.3g})")
