"""Dev check on a GPU (run from the repository root after scripts/dev/gpu_kernels_in_model.py has
written /tmp/g20_2layers): captures the MoE inputs of the first decode step that script found
wrong (token 500 after its 2500-token prompt, kernels off) and compares, on exactly those inputs,
kernels A and B, the plain-MLX reference on the GPU and the reference on the CPU."""
import os
import sys
from pathlib import Path

sys.path.insert(0, ".")
sys.path.insert(0, "scripts")
import mlx.core as mx  # noqa: E402

from gptoss_mlx import model as M  # noqa: E402
from gptoss_mlx.kernels import moe, registry  # noqa: E402
from gptoss_mlx.loading import load_model  # noqa: E402

os.environ[registry.ENV_VAR] = "off"
model = load_model(Path("/tmp/g20_2layers"))
prompt = [(7 * t + 1000) % 199000 for t in range(2500)]
captured = []
orig = M.MLP.__call__
def spy(self, x, residual):
    if x.shape[1] == 1:
        captured.append((self, x.reshape(1, -1), residual.reshape(1, -1)))
    return orig(self, x, residual)
M.MLP.__call__ = spy
cache = model.make_cache()
for a in range(0, len(prompt), 1024):
    mx.eval(model(mx.array([prompt[a:a + 1024]]), cache=cache)[:, -1])
mx.eval(model(mx.array([[500]]), cache=cache))
del os.environ[registry.ENV_VAR]; registry.reset()
for n, (mlp, x, residual) in enumerate(captured):
    indices, weights = moe.top_k_softmax(mlp.router(x), 4)
    ex = mlp.experts
    gu, down = ex.gate_up_proj, ex.down_proj
    mx.eval(indices, weights)
    print("layer", n, "experts", indices.tolist(), "x max", mx.abs(x).max().item())
    a = (x, indices, gu.weight, gu.scales, gu.bias, ex.swiglu_limit)
    (act,) = moe.GATE_UP_SPEC.launch(*a)
    (act_cpu,) = moe.GATE_UP_SPEC.expected(*a)
    act_gpu = moe.gate_up_swiglu_reference(*[v.astype(mx.float32) if isinstance(v, mx.array) and v.dtype == mx.bfloat16 else v for v in a])[0]
    print(" A kernel vs CPU ref", registry.max_error([act], [act_cpu]), "GPU ref vs CPU ref", registry.max_error([act_gpu], [act_cpu]),
          "act max", mx.abs(act_cpu).max().item())
    b = (act_cpu.astype(x.dtype), indices, weights.astype(x.dtype), down.weight, down.scales, down.bias, residual)
    (y,) = moe.DOWN_SPEC.launch(*b)
    (y_cpu,) = moe.DOWN_SPEC.expected(*b)
    y_gpu = moe.down_combine_reference(*[v.astype(mx.float32) if isinstance(v, mx.array) and v.dtype == mx.bfloat16 else v for v in b])[0]
    print(" B kernel vs CPU ref", registry.max_error([y], [y_cpu]), "GPU ref vs CPU ref", registry.max_error([y_gpu], [y_cpu]),
          "y max", mx.abs(y_cpu).max().item())
    e = mx.abs(act.astype(mx.float32) - act_cpu).reshape(-1)
    i = mx.argmax(e).item(); print("  A worst", divmod(i, act.shape[-1]), act.reshape(-1)[i].item(), act_cpu.reshape(-1)[i].item())
