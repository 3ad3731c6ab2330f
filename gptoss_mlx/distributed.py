"""One model across several processes or machines: MLX's ``mx.distributed`` (the ring backend over
TCP, JACCL over Thunderbolt 5 RDMA, NCCL on CUDA), every rank started by ``mlx.launch``.

Two ways to split gpt-oss (``Model.shard``):

- ``tensor``: every rank runs every layer with its share of the attention (KV heads with their
  query heads) and of the experts (E/N each: expert parallel). One all-reduce after the attention
  and one after the MoE, per layer and token: fast over RDMA, slow over TCP.
- ``pipeline``: each rank runs a contiguous range of layers and passes the hidden state on, one
  D-vector per boundary and token. Rank N-1 is the first stage (embedding, first layers), rank 0
  the last (last layers, final norm, unembedding), as mlx-lm orders its stages: every rank
  receives before it sends, so no rank waits for a message it has yet to send.

Rank 0 does all I/O and sampling. Its engine (:class:`Leader`) broadcasts every operation that
touches the model or its cache (a prefill with its prompt, a decode step with its token, a reset,
a switch of prompt cache), and the other ranks (:func:`follow`) run the same operation on their
own engine, so every rank's cache (ring buffers, snapshots, rewinds) holds the same positions.
The decode step's token is broadcast inside rank 0's graph: rank 0 never waits for it. Each
session opens with rank 0's :func:`fingerprint`, so that a rank started with another model or
other options says so instead of running different operations.

A rank that dies or hangs must not leave the others waiting in a collective forever:
:class:`Watchdog` keeps a TCP heartbeat between rank 0 and every other rank (outside MLX), and
ends the process with one message when a peer goes quiet.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .engine_thread import engine_thread
from .generate import Engine, PromptCache, forward

SHARDINGS = ("tensor", "pipeline")
BACKENDS = ("ring", "jaccl", "nccl", "mpi")
# Heartbeats every HEARTBEAT_S; a peer silent for HEARTBEAT_TIMEOUT_S is taken for dead. MLX
# releases the GIL while it computes, so a long prefill chunk does not silence the heartbeat.
HEARTBEAT_S = 0.5
HEARTBEAT_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 60.0


class DistributedError(RuntimeError):
    """A distributed run that cannot start or cannot go on."""


# --------------------------------------------------------------------------- starting
def launched_backend() -> str | None:
    """The backend mlx.launch set this process up for (from its environment), None if none."""
    env = os.environ
    if "MLX_RANK" not in env and "OMPI_COMM_WORLD_RANK" not in env:
        return None
    if "MLX_JACCL_COORDINATOR" in env:
        return "jaccl"
    if "NCCL_HOST_IP" in env:
        return "nccl"
    if "MLX_HOSTFILE" in env:
        return "ring"
    return "mpi"


def choose_sharding(sharding: str, backend: str) -> str:
    """``auto``: pipeline over the ring (TCP: one small message per stage and token), tensor over
    JACCL and NCCL (RDMA / NVLink: the two all-reduces per layer cost microseconds)."""
    if sharding != "auto":
        return sharding
    return "pipeline" if backend in ("ring", "mpi") else "tensor"


def init(backend: str = "any", timeout_s: float = CONNECT_TIMEOUT_S):
    """Join the group (``mx.distributed.init``) on the engine thread; a rank that cannot reach
    the others within ``timeout_s`` exits with one message instead of waiting forever."""
    rank = os.environ.get("MLX_RANK", "?")
    message = (f"gptoss-mlx: error: rank {rank} could not connect to the other ranks within "
               f"{timeout_s:.0f}s ({_where()}); did every host start, and can they reach each other?")
    check_hostfile()
    # MLX holds the GIL while it connects, so no Python thread could act: a shell does. It
    # reads a pipe this process holds open: at its end (this process is gone, however it
    # ended) it ends its own process group (its sleep too) and kills nothing else.
    # (An asynchronous list's standard input is /dev/null: the reader is given the pipe as fd 3.)
    timer = subprocess.Popen(["sh", "-c", 'exec 3<&0; (cat <&3 >/dev/null; kill 0) & '
                              'sleep "$1"; printf "%s\\n" "$2" >&2; kill -KILL "$3"',
                              "sh", str(timeout_s), message, str(os.getpid())],
                             stdin=subprocess.PIPE, start_new_session=True)
    # Nor can a Python handler run meanwhile: Ctrl-C and SIGTERM end the process as they come.
    handlers = ({sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGINT, signal.SIGTERM)}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        return engine_thread().call(mx.distributed.init, strict=True, backend=backend)
    except RuntimeError as e:
        hint = ("; MLX_RANK is set but MLX_HOSTFILE is not: the ring backend needs both (mlx.launch "
                "sets them), MPI its own launcher" if launched_backend() == "mpi"
                and "OMPI_COMM_WORLD_RANK" not in os.environ else "")
        raise DistributedError(f"rank {rank} could not join the group ({_where()}): {e}{hint}") from None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        os.killpg(timer.pid, signal.SIGKILL)  # the shell, its sleep and its reader
        timer.stdin.close()
        timer.wait()


def check_hostfile() -> None:
    """What MLX does not check before it uses the ring backend's hostfile: that it lists each
    rank's addresses (``[]`` or ``{}`` crash it with a floating-point exception)."""
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return
    try:
        with open(path) as f:
            hosts = json.load(f)
    except OSError as e:  # (MLX's own message was a JSON parser's, of an empty input)
        raise DistributedError(f"{path} (MLX_HOSTFILE): {e.strerror or e}") from None
    except ValueError as e:
        raise DistributedError(f"{path} (MLX_HOSTFILE) is not JSON ({e})") from None
    if not isinstance(hosts, list) or not hosts or not all(
            isinstance(h, list) and h and all(isinstance(a, str) for a in h) for h in hosts):
        raise DistributedError(f"{path} (MLX_HOSTFILE) must list each rank's addresses: "
                               '[["10.0.0.1:5000"], ["10.0.0.2:5000"]]')


_joined = None


def join(backend: str = "any"):
    """The group of ranks mlx.launch started (joined on the first call), the others watched by
    a :class:`Watchdog`."""
    global _joined
    if _joined is None:
        _joined = init(backend)
        if _joined.size() > 1:
            atexit.register(Watchdog(_joined).close)
    return _joined


def _where() -> str:
    hostfile = os.environ.get("MLX_HOSTFILE")
    return f"hostfile {hostfile}" if hostfile else "backend " + (launched_backend() or "none")


_dying = threading.Event()  # set by _die: the process is ending with its one line
DYING_GRACE_S = 3.0  # how long a failure of the main thread waits to see if a peer's end explains it


def _quiet_while_dying(hook):
    """``sys.excepthook`` for a rank with a watchdog. When a peer goes, the main thread's
    collective fails too, often a moment before the watchdog notices; its traceback would then
    precede or interleave the watchdog's one line. So an uncaught exception first waits a moment
    for _die: if the watchdog is ending the process, it stays silent and lets it."""
    if getattr(hook, "quiet_while_dying", False):  # installed already (another Watchdog)
        return hook

    def excepthook(*exc_info):
        if _dying.wait(DYING_GRACE_S):
            threading.Event().wait()  # _die's os._exit ends the process
        hook(*exc_info)
    excepthook.quiet_while_dying = True
    return excepthook


def _die(message: str) -> None:
    """End the process from any thread, even while MLX waits in a collective."""
    _dying.set()
    print(f"gptoss-mlx: error: {message}", file=sys.stderr, flush=True)
    # The one line is all: the main thread's collective fails too as the peer goes, and its
    # traceback, printed while this thread ends the process, would follow it half-written.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
    os._exit(1)


# --------------------------------------------------------------------------- what each rank holds
@dataclass(frozen=True)
class Part:
    """What one rank holds of one parameter of the whole model."""
    name: str  # its name in the sharded model (pipeline stages number their layers from 0)
    rows: tuple[tuple[int, int], ...] | None = None  # ranges of the first axis, None: all
    cols: tuple[int, int] | None = None  # (rank, size): the rank's equal share of the last axis
    zero: bool = False  # zeros of the full shape: a bias that only rank 0 adds

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        shape = list(full)
        if self.rows is not None:
            shape[0] = sum(b - a for a, b in self.rows)
        if self.cols is not None:
            shape[-1] //= self.cols[1]
        return tuple(shape)

    def take(self, array: mx.array) -> mx.array:
        """This rank's part of the full ``array``, copied (a view would keep the whole alive)."""
        if self.rows is self.cols is None and not self.zero:
            return array
        if self.zero:
            return mx.zeros_like(array)
        if self.rows is not None:
            array = mx.concatenate([array[a:b] for a, b in self.rows])
        if self.cols is not None:
            rank, size = self.cols
            n = array.shape[-1] // size
            array = array[..., rank * n:(rank + 1) * n]
        return mx.contiguous(array)


def share_config(config, size: int, mode: str):
    """A config about the size of one rank's part, to plan its memory with: the heads and experts
    divided (tensor), or the layers of the largest stage (pipeline)."""
    if mode == "pipeline":
        n = -(-config.num_hidden_layers // size)
        return config.replace(num_hidden_layers=n, layer_types=config.layer_types[:n])
    experts = config.num_local_experts // size
    return config.replace(num_attention_heads=config.num_attention_heads // size,
                          num_key_value_heads=config.num_key_value_heads // size,
                          num_local_experts=experts,
                          num_experts_per_tok=min(config.num_experts_per_tok, experts))


def check_shardable(config, size: int, mode: str, backend: str | None = None) -> None:
    if mode not in SHARDINGS:
        raise ValueError(f"sharding must be tensor or pipeline, got {mode!r}")
    if mode == "pipeline" and backend == "nccl":  # MLX 0.32: "[nccl] Recv not supported"
        raise ValueError("pipeline parallel passes the hidden state from rank to rank, and MLX's "
                         "NCCL backend has no send or receive; use --sharding tensor (the default "
                         "over NCCL) or the ring backend")
    if mode == "tensor":
        kv, experts = config.num_key_value_heads, config.num_local_experts
        if kv % size or experts % size:
            raise ValueError(
                f"tensor parallel over {size} ranks splits the {kv} KV heads and the {experts} "
                f"experts evenly, and {size} does not divide both; use a rank count that does "
                f"({', '.join(str(n) for n in range(2, kv + 1) if kv % n == 0 and experts % n == 0)})"
                " or --sharding pipeline")
    elif size > config.num_hidden_layers:
        raise ValueError(f"pipeline parallel over {size} ranks needs at least {size} layers; "
                         f"this model has {config.num_hidden_layers}")


def pipeline_layers(num_layers: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of the layers rank ``rank`` runs: rank size-1 the first ones, rank 0 the
    last; the earlier stages take one more when they do not divide evenly."""
    stage = size - 1 - rank
    base, extra = divmod(num_layers, size)
    start = stage * base + min(stage, extra)
    return start, start + base + (stage < extra)


def shard_part(config, name: str, rank: int, size: int, mode: str) -> Part | None:
    """What rank ``rank`` of ``size`` holds of the parameter ``name`` (a name of the whole model,
    e.g. ``layers.3.self_attn.qkv_proj.weight``), None if nothing."""
    head = name.split(".")[0]
    if head in ("norm", "lm_head"):
        return Part(name) if rank == 0 else None
    if head == "embed_tokens":
        return Part(name) if mode == "tensor" or rank == size - 1 else None
    _, index, rest = name.split(".", 2)
    if mode == "pipeline":
        start, stop = pipeline_layers(config.num_hidden_layers, rank, size)
        i = int(index)
        return Part(f"layers.{i - start}.{rest}") if start <= i < stop else None
    d, H, KV = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    if rest.startswith("self_attn.qkv_proj."):  # rows: all queries, then keys, then values
        q, kv = H // size * d, KV // size * d
        return Part(name, rows=((rank * q, (rank + 1) * q),
                                (H * d + rank * kv, H * d + (rank + 1) * kv),
                                ((H + KV) * d + rank * kv, (H + KV) * d + (rank + 1) * kv)))
    if rest == "self_attn.sinks":
        h = H // size
        return Part(name, rows=((rank * h, (rank + 1) * h),))
    if rest == "self_attn.o_proj.bias":
        return Part(name, zero=rank != 0)
    if rest.startswith("self_attn.o_proj."):  # its input columns: the heads' outputs
        return Part(name, cols=(rank, size))
    if rest.startswith("mlp.experts."):
        e = config.num_local_experts // size
        return Part(name, rows=((rank * e, (rank + 1) * e),))
    return Part(name)  # norms, router: every rank


def shard_model(model, group, mode: str) -> None:
    """Model.shard: keep this rank's modules and parameters (see the module docstring)."""
    config, size, rank = model.config, group.size(), group.rank()
    check_shardable(config, size, mode, launched_backend())
    model.sharding = mode
    params = nn.utils.tree_flatten(model.parameters())
    kept = [(part.name, part.take(value)) for name, value in params
            if (part := shard_part(config, name, rank, size, mode)) is not None]
    if mode == "pipeline":
        start, stop = pipeline_layers(config.num_hidden_layers, rank, size)
        model.layers = model.layers[start:stop]
        model.stage = PipelineStage(group, config.hidden_size)
        if rank != size - 1:
            model.embed_tokens = None
    else:
        experts = config.num_local_experts // size
        for layer in model.layers:
            attention = layer.self_attn
            attention.num_heads //= size
            attention.num_kv_heads //= size
            attention.group = layer.mlp.group = group
            layer.mlp.first_expert = rank * experts
    if rank != 0:
        model.norm = model.lm_head = None
    model.update(nn.utils.tree_unflatten(kept))


class PipelineStage:
    """A pipeline rank's messages: it receives its input from the rank after it (the stage
    before) and sends its output to the rank before it."""

    def __init__(self, group, hidden_size: int):
        self.group, self.rank, self.hidden_size = group, group.rank(), hidden_size

    def receive(self, inputs: mx.array, dtype: mx.Dtype) -> mx.array:
        """The previous stage's hidden states for ``inputs`` (B, L) -> (B, L, D). They come
        after ``inputs``, which on rank 0 carry the broadcast token: the receive must not be
        waiting before that broadcast has run."""
        x = mx.distributed.recv((*inputs.shape, self.hidden_size), dtype, self.rank + 1,
                                group=self.group, stream=mx.cpu)  # it waits: see from_rank0
        return mx.depends(x, inputs)

    def send(self, x: mx.array, cache: list) -> mx.array:
        """Send ``x`` to the next stage. The engine evaluates only the cache during a prefill,
        so the cache is made to depend on the send."""
        sent = mx.distributed.send(x, self.rank - 1, group=self.group, stream=mx.cpu)
        if cache[-1] is not None:
            cache[-1].kv = mx.depends(cache[-1].kv, sent)
        return sent


# --------------------------------------------------------------------------- following rank 0
STEP, PREFILL, USE, EXIT, HELLO = 1, 2, 3, 4, 5  # the operations rank 0 broadcasts
PROTOCOL = 2  # the version of these operations


def fingerprint(engine: Engine) -> dict[str, int]:
    """What every rank must agree on to run the same operations on the same model: its shape,
    its weights (a checksum of a sample of every tensor, loading.tensors_digest: another model of
    the same shape, or a fine-tune of this one, would run and answer nonsense) and the precision
    they are held in."""
    config, model = engine.model.config, engine.model
    return {"protocol": PROTOCOL, "sharding (1 tensor, 2 pipeline)": SHARDINGS.index(model.sharding) + 1,
            "layers": config.num_hidden_layers, "hidden size": config.hidden_size,
            "vocabulary": config.vocab_size, "experts": config.num_local_experts,
            "max context": engine.max_context, "prefill step": engine.prefill_step,
            "weights (a checksum of its tensors)": getattr(model, "weights_digest", 0),
            "config (a checksum of its values)": getattr(model, "config_digest", 0),
            "dense bits": dense_bits(model)}


def dense_bits(model: nn.Module) -> int:
    """The bits the dense layers are held in: 16 (bf16), or those they were quantized to."""
    quantized = (m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)))
    return next((m.bits for m in quantized), 16)


def from_rank0(x: mx.array, group) -> mx.array:
    """Rank 0's ``x`` on every rank (the others pass an array of the same shape, ignored). On
    the CPU stream: a follower may wait here for minutes (rank 0 waits for its user), and Metal
    ends a command buffer that waits longer than a few seconds. NCCL reduces on the GPU only
    (given the CPU stream, MLX 0.32 looks for a GPU stream of another thread), and CUDA lets a
    stream wait."""
    x = x if group.rank() == 0 else mx.zeros_like(x)
    return mx.distributed.all_sum(x, group=group, stream=None if launched_backend() == "nccl" else mx.cpu)


class Leader(Engine):
    """Rank 0's engine: each operation on the model or its cache is broadcast to the followers
    before it runs here (a reset is a switch to a new cache). Any thread may call it, as an
    Engine."""

    batches = False  # the followers replay one sequence's operations, not a decode batch
    forks = False  # the followers hold their own copy of each cache, which a fork here would not copy

    def __init__(self, model, group, max_context: int | None = None, prefill_step: int = 2048):
        self.group = group
        self._keys = weakref.WeakValueDictionary()  # key -> PromptCache the followers hold too
        self._next_key = 1
        self._following = False  # whether the followers are in follow(), past its handshake
        super().__init__(model, max_context, prefill_step)

    def _send(self, op: int, payload: list[int] = ()) -> None:
        if not self._following:  # the first operation since the start or since close()
            self._following = True
            self._send(HELLO, list(fingerprint(self).values()))
        header = mx.array([op, len(payload)], dtype=mx.int32)
        mx.eval(from_rank0(header, self.group))
        if payload:
            mx.eval(from_rank0(mx.array(payload, dtype=mx.int32), self.group))

    @property
    def prompt_cache(self) -> PromptCache:
        return self._prompt_cache

    @prompt_cache.setter
    def prompt_cache(self, pc: PromptCache) -> None:
        """Switching caches (a reset, the server's pool): the followers switch to theirs and
        forget those that rank 0 no longer holds."""
        if not hasattr(pc, "key"):
            pc.key, self._next_key = self._next_key, self._next_key + 1
        self._keys[pc.key] = pc
        self._prompt_cache = pc
        engine_thread().call(self._send, USE, [pc.key, *self._keys.keys()])

    def _prefill(self, prompt: list[int], instructions: int = 0, stop=None) -> mx.array:
        """Without the instructions' snapshot: it splits a chunk there, and every rank must run
        the same chunks (their all-reduces pair up); so also to its end, whatever ``stop`` says."""
        self._send(PREFILL, prompt)
        return super()._prefill(prompt)

    def _forward_async(self, y: mx.array) -> mx.array:
        header = mx.concatenate([mx.array([STEP], mx.int32), y.reshape(1).astype(mx.int32)])
        return super()._forward_async(from_rank0(header, self.group)[1:])

    def close(self) -> None:
        """End the followers' follow() (they run until this, or until rank 0 is gone)."""
        engine_thread().call(self._send, EXIT)
        self._following = False


_follower_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # kept from one follow() to the next


def follow(engine: Engine, group) -> None:
    """Ranks other than 0: run rank 0's engine operations on ``engine`` until rank 0 exits.
    Runs on the engine thread. Errors that rank 0 raises too (a prompt over the context, NaN
    logits) are rank 0's to report; the follower goes on with the next operation."""
    def receive(n: int) -> list[int]:  # as Leader._send: no message for an empty payload
        return from_rank0(mx.zeros((n,), mx.int32), group).tolist() if n else []

    op, n = receive(2)
    theirs, ours = receive(n) if op == HELLO else [], fingerprint(engine)
    if theirs != list(ours.values()):
        differ = [f"{name} {mine} here, {theirs[i] if i < len(theirs) else '?'} on rank 0"
                  for i, (name, mine) in enumerate(ours.items()) if i >= len(theirs) or theirs[i] != mine]
        raise DistributedError(f"rank {group.rank()} does not run what rank 0 runs ({'; '.join(differ)}): "
                               "start every rank with the same gptoss-mlx, model and options")
    caches = _follower_caches.setdefault(engine, {})  # rank 0's key -> this rank's PromptCache
    while True:
        op, n = receive(2)  # the operation, and its payload's length or STEP's token
        if op == STEP:  # n: the token rank 0 sampled (broadcast from inside its decode step)
            mx.async_eval(forward(engine.model, engine.prompt_cache, [n]))
        elif op == PREFILL:
            try:
                engine._prefill(receive(n))
            except ValueError:  # ContextLengthError, NonFiniteLogitsError, a bad token id
                pass
        elif op == USE:
            key, *alive = receive(n)
            pc = caches.get(key) or PromptCache(engine.model.make_cache())
            for gone in set(caches) - set(alive):
                del caches[gone]
            engine.prompt_cache = caches[key] = pc
        elif op == EXIT:
            return
        else:
            raise DistributedError(f"unknown operation {op} from rank 0: the ranks run different "
                                   "versions of gptoss-mlx")


# --------------------------------------------------------------------------- noticing a lost rank
def rank0_host() -> str:
    """Rank 0's address as the other ranks reach it, from mlx.launch's environment."""
    env = os.environ
    if env.get("GPTOSS_MLX_RANK0_HOST"):
        return env["GPTOSS_MLX_RANK0_HOST"]
    if env.get("MLX_HOSTFILE"):  # ring: [[ "ip:port", ...] per rank]
        try:
            with open(env["MLX_HOSTFILE"]) as f:
                return json.load(f)[0][0].rsplit(":", 1)[0]
        except (OSError, ValueError, LookupError, AttributeError) as e:
            raise DistributedError(f"{env['MLX_HOSTFILE']} (MLX_HOSTFILE): no address for rank 0 "
                                   f"({e})") from None
    if env.get("MLX_JACCL_COORDINATOR"):
        return env["MLX_JACCL_COORDINATOR"].rsplit(":", 1)[0]
    if env.get("NCCL_HOST_IP"):
        return env["NCCL_HOST_IP"]
    raise DistributedError("cannot tell rank 0's address from the environment: set "
                           "GPTOSS_MLX_RANK0_HOST to it")


class Watchdog:
    """Heartbeats between rank 0 and each other rank over their own TCP connections (not MLX's):
    each side writes a byte every HEARTBEAT_S. A peer whose connection closes, or that stays
    silent for ``timeout_s``, ends this process with one message: otherwise MLX would wait in a
    collective for it forever. Rank 0 ends the session: at its exit it says goodbye, and the
    others, at theirs, wait a moment for that goodbye, so that a normal end is no alarm."""

    BEAT, BYE = b".", b"x"
    LINGER_S = 2.0  # how long a rank other than 0 waits at exit for rank 0's goodbye

    def __init__(self, group, timeout_s: float = HEARTBEAT_TIMEOUT_S):
        self.rank, self.timeout_s = group.rank(), timeout_s
        self.peers: dict[int, socket.socket] = {}
        self.closing = False
        self.goodbye = threading.Event()  # rank 0 said goodbye (on the other ranks)
        listener = None
        if self.rank == 0:
            listener = socket.create_server((rank0_host(), 0))
            listener.settimeout(timeout_s)
        port = mx.array([listener.getsockname()[1] if listener else 0], mx.int32)
        port = engine_thread().call(lambda: from_rank0(port, group).item())
        try:
            if listener:
                while len(self.peers) < group.size() - 1:
                    conn, _ = listener.accept()
                    conn.settimeout(timeout_s)
                    self.peers[conn.recv(1)[0]] = conn
                listener.close()
            else:
                conn = socket.create_connection((rank0_host(), port), timeout=timeout_s)
                conn.sendall(bytes([self.rank]))
                self.peers[0] = conn
        except (OSError, IndexError) as e:
            raise DistributedError(f"rank {self.rank}: the heartbeat connection to the other ranks "
                                   f"failed ({e})") from None
        sys.excepthook = _quiet_while_dying(sys.excepthook)
        for peer, conn in self.peers.items():
            threading.Thread(target=self._listen, args=(peer, conn), daemon=True,
                             name=f"gptoss-mlx-heartbeat-{peer}").start()
        threading.Thread(target=self._beat, daemon=True, name="gptoss-mlx-heartbeat").start()

    def _beat(self) -> None:
        while not self.closing:
            for conn in self.peers.values():
                try:
                    conn.sendall(self.BEAT)
                except OSError:
                    pass  # that peer's listener reports it
            time.sleep(HEARTBEAT_S)

    def _listen(self, peer: int, conn: socket.socket) -> None:
        who = "rank 0" if peer == 0 else f"rank {peer}"
        while True:
            try:
                data = conn.recv(64)
            except socket.timeout:
                problem = f"{who} has not answered for {self.timeout_s:.0f}s (hung, or the network is down)"
            except ConnectionResetError:  # it died with our heartbeats unread
                problem = f"{who} exited"
            except OSError as e:
                problem = f"the connection to {who} broke ({e.strerror or e})"
            else:
                if self.BYE in data:
                    self.goodbye.set()
                    return
                if data:
                    continue
                problem = f"{who} exited"
            if not self.closing:
                _die(f"{problem}; rank {self.rank} stops too")
            return

    def close(self) -> None:
        if self.rank != 0:
            self.goodbye.wait(self.LINGER_S)
        self.closing = True
        for conn in self.peers.values():
            try:
                if self.rank == 0:
                    conn.sendall(self.BYE)
                conn.close()
            except OSError:
                pass
