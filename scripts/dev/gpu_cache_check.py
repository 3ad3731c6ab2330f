"""Dev check: full forward vs chunked decode diffs on the current device (float32 and bf16)."""
import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2])); sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlx.core as mx, numpy as np
import make_tiny_checkpoint as mtc
from gptoss_mlx.loading import load_model
cfg = mtc.TINY.replace(vocab_size=512)
mtc.write_hf(Path("/tmp/ckc"), cfg, seed=1)
m = load_model(Path("/tmp/ckc"), mx.float32)
T = [(i * 37 + 11) % 512 for i in range(40)]
full = np.array(m(mx.array([T]))[0])
for sizes in ([1]*40, [3]*13+[1], [8]*5, [13,13,14], [1, 39]):
    c = m.make_cache(); outs=[]; s=0
    for n in sizes:
        outs.append(np.array(m(mx.array([T[s:s+n]]), cache=c)[0])); s+=n
    d = np.abs(np.concatenate(outs)-full).max(-1)
    print(sizes[:4], "max", d.max(), "per-pos", np.round(d, 5).tolist())
# attention alone: sdpa with bool mask vs numpy
q = mx.random.normal((1,4,6,16)); k = mx.random.normal((1,2,10,16)); v = mx.random.normal((1,2,10,16))
sinks = mx.random.normal((4,))
mask = mx.array(np.tril(np.ones((6,10),bool), 4) & ~np.tril(np.ones((6,10),bool), 0))
for mk in [None, "causal", mask]:
    o = mx.fast.scaled_dot_product_attention(q,k,v,scale=0.3,mask=mk,sinks=sinks)
    with mx.stream(mx.cpu):
        oc = mx.fast.scaled_dot_product_attention(q,k,v,scale=0.3,mask=mk,sinks=sinks)
    print("sdpa gpu vs cpu", None if mk is None else (mk if isinstance(mk,str) else "bool"), mx.abs(o-oc).max().item())
