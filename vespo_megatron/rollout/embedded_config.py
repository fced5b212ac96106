"""The embedded engine's settings, apart from the engine itself: the trainer's config (and so the command
line) reads them without importing megatron-core, which the engine needs."""

from __future__ import annotations

from dataclasses import dataclass

from vespo_megatron.base.validation import ConfigError, check_choice, check_float, check_int

from .mismatch import FP8_MODES

DECODE_ATTENTION = ("sdpa", "bmm")  # megatron.reference_attention.DECODE_KERNEL's choices

__all__ = ["EmbeddedEngineConfig"]


@dataclass(frozen=True, kw_only=True)
class EmbeddedEngineConfig:
    """precision: fp32 | bf16 (the engine's forward under bf16 autocast while the trainer stays in fp32: a
    real train/inference mismatch). lag: sample with the weights of `lag` syncs ago (asynchronous RL).
    kv_cache: KV-cached batched decoding (False: recompute the prefix every token; layouts the cache cannot
    serve fall back to it). fp8: off | per_tensor | per_row: fake-quantise the attention and expert GEMMs
    (weights and inputs) to e4m3 in the engine only. router_noise: std of Gaussian noise added to the router
    logits in the engine only (0: off). dense_moe_rows: MoE layers compute every expert on every token, without
    the dispatcher and its host reads, for forwards of at most this many expert rows (experts x tokens: 8192 is
    a decode step of 512 rows at 16 experts; `megatron.small_batch_moe`); 0: megatron's dispatcher always. On by
    default since an H100 timed it: 46,000-54,300 new tokens/s against 29,100-34,100 with the dispatcher (testbed
    model, 512 x 256 tokens; bench/results/engine_testbed_dense_moe_h100.md); the same tokens and routing.
    stop_check_every: read "have all rows stopped?" to the host every this many decode steps (1: every step;
    a device sync each on CUDA). Rows that stopped only ride along, so the tokens are the same; up to this many
    - 1 steps run after the last row stopped. Default 1: every 8 steps made no difference the H100 could tell
    from its run-to-run spread. stop_read_lag: on CUDA the flag the host reads is the one of this many steps
    before, copied without blocking, so the host keeps queueing steps while the device runs them (0: this step's,
    a sync each); up to this many steps run after the last row stopped, with the same tokens. Default 2: on an H100
    it made no difference in the testbed's N = 1 step (engine 0.115 s both, bench/results/engine_round13_h100/),
    where the replayed decode is bound by the GPU; it keeps a host that is slower than the GPU from idling it
    between steps. cuda_graphs: replay each KV-cached decode step, forward and sampler, as a CUDA graph,
    captured the first time a position is decoded for a batch shape and kept for later generations
    (`rollout.decode_graphs`: the same kernels, without the host's launch cost). On by default since an H100 timed
    it: 80,900-81,800 new tokens/s against 45,100-48,600 eager (testbed model, 512 x 256), the testbed's N = 1 step
    0.94-1.19 -> 0.31-0.38 s, and its generations bitwise the eager engine's under bf16 + fp8, R3 and lag
    (bench/results/engine_graphs_h100.md); with the sampler in the graph 92,050 against 86,578 for the forward
    alone, in one call (bench/results/engine_round13_h100/). It needs CUDA, one model-parallel rank, the dispatcher-free MoE path and no router
    noise; otherwise the engine decodes eagerly and says why (`EmbeddedEngine.graph_reason`). compile_decode: run
    the decode steps' forward through torch.compile with dynamic shapes (`rollout.compiled_decode`: one compile
    for every position; fused elementwise kernels, captured by the CUDA graphs). Off by default: its kernels round
    differently from the trainer's eager forward (~1e-6 on fp32 logits), and the first generation pays the compile.
    Needs one model-parallel rank, fp8 off and no router noise (`EmbeddedEngine.compile_reason` says why not).
    Under precision="bf16" the fused kernels keep their intermediates in fp32, so the bf16 mismatch they inject
    is still there but not the eager engine's (tests/test_compiled_decode.py).
    decode_attention: how the reference attention's fused (CUDA) path attends a decode step's one query over the
    cached keys during generation: "sdpa" (torch's SDPA kernel) or "bmm" (two batched matmuls and a softmax on the
    cache's strided views; `megatron.reference_attention.DECODE_KERNEL`). The same attention up to fp32 rounding
    (~1e-6); training never decodes, so only the engine sees it. On an H100, compiled and replayed, bmm made
    235,900 new tokens/s against 187,500 with SDPA (testbed runs' model, 256 x 64; bench/results/engine_round14_h100/)."""

    precision: str = "fp32"
    lag: int = 0
    kv_cache: bool = True
    fp8: str = "off"
    router_noise: float = 0.0
    dense_moe_rows: int = 8192
    stop_check_every: int = 1
    stop_read_lag: int = 2
    cuda_graphs: bool = True
    compile_decode: bool = False
    decode_attention: str = "sdpa"

    def __post_init__(self) -> None:
        check_choice("EmbeddedEngineConfig", "precision", self.precision, ("fp32", "bf16"))
        check_int("EmbeddedEngineConfig", "lag", self.lag, low=0, high=64)
        if not isinstance(self.kv_cache, bool):
            raise ConfigError("EmbeddedEngineConfig", "kv_cache", "a bool", self.kv_cache)
        check_choice("EmbeddedEngineConfig", "fp8", self.fp8, FP8_MODES)
        check_float("EmbeddedEngineConfig", "router_noise", self.router_noise, nonnegative=True)
        check_int("EmbeddedEngineConfig", "dense_moe_rows", self.dense_moe_rows, low=0)
        check_int("EmbeddedEngineConfig", "stop_check_every", self.stop_check_every, low=1, high=1024)
        check_int("EmbeddedEngineConfig", "stop_read_lag", self.stop_read_lag, low=0, high=64)
        check_choice("EmbeddedEngineConfig", "decode_attention", self.decode_attention, DECODE_ATTENTION)
        for name in ("cuda_graphs", "compile_decode"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError("EmbeddedEngineConfig", name, "a bool", getattr(self, name))
