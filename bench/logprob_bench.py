"""Benchmark: token log-probs + entropy from (vocab-parallel) logits. Not a test.

For one TP=1 logits tensor [T, V] and one V/4 shard [T, V/4] (a single shard simulated on one device with
tp_group=None: the shard is treated as the whole vocab, same work per rank minus the two [T]-sized
all-reduces), times the log-prob + entropy pass, forward (no grad) and forward+backward, and measures the
peak memory above the inputs, for:

* matmul      the LM-head matmul alone, hidden[T, H] @ W[V, H]^T in bf16 (the floor); its backward is the two
              matmuls giving d hidden and d W
* eager_fp32  logits.float() / temperature -> log_softmax -> gather, entropy = -(p * logp).sum(-1)
* chunked     vocab_parallel_logprobs(backend="torch"), the chunked torch path
* triton      vocab_parallel_logprobs(backend="triton"), fused kernels (CUDA with Triton only)

"extra" memory is the peak allocated during the call minus what was allocated before it (the logits and
the matmul's inputs); for forward+backward it includes the logits-sized gradient that autograd returns,
and "extra excl. grad" subtracts that unavoidable buffer. On CPU the peak is the process's peak RSS
(VmHWM, reset through /proc/self/clear_refs) with glibc's mmap threshold pinned so freed buffers leave RSS.

Writes bench/results/logprob_<device>.json and .md (or under --out).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Load the module from its file: the package __init__ files may import megatron-core, which the GPU bench
# machine does not have.
_spec = importlib.util.spec_from_file_location(
    "vocab_parallel", os.path.join(ROOT, "vespo_megatron", "parallel", "vocab_parallel.py")
)
vp = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = vp
_spec.loader.exec_module(vp)

SIZES = {"cpu": dict(T=512, H=256, V=8192), "qwen3": dict(T=16384, H=2048, V=151936)}
MIB = 1 << 20


# ----------------------------------------------------------------------------------------------------------
# memory and time measurement
# ----------------------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def peak_extra_bytes(fn, device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _proc_status_kib("VmRSS")
        out = fn()
        peak = (_proc_status_kib("VmHWM") - base) * 1024
    del out
    return peak


def time_ms(fn, device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------------------
# the variants: each returns (forward fn, forward+backward fn)
# ----------------------------------------------------------------------------------------------------------


def eager_fp32(logits, targets, temperature):
    z = logits.float() / temperature
    logp = torch.log_softmax(z, dim=-1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def make_variants(inp, temperature, backends):
    logits, targets, hidden, weight, g_lp, g_h = (
        inp[k] for k in ("logits", "targets", "hidden", "weight", "g_lp", "g_h")
    )
    leaf = logits.detach().requires_grad_()
    variants = {}

    def mm_fwd():
        with torch.no_grad():
            return hidden @ weight.t()

    h_leaf, w_leaf = hidden.detach().requires_grad_(), weight.detach().requires_grad_()

    def mm_fwd_bwd():
        out = h_leaf @ w_leaf.t()
        return torch.autograd.grad(out, (h_leaf, w_leaf), grad_outputs=logits)  # any [T, V] bf16 upstream

    variants["matmul"] = (mm_fwd, mm_fwd_bwd)

    def eager_fwd():
        with torch.no_grad():
            return eager_fp32(logits, targets, temperature)

    def eager_fwd_bwd():
        lp, ent = eager_fp32(leaf, targets, temperature)
        return torch.autograd.grad((lp * g_lp).sum() + (ent * g_h).sum(), leaf)

    variants["eager_fp32"] = (eager_fwd, eager_fwd_bwd)

    for name, backend in (("chunked", "torch"), ("triton", "triton")):
        if name not in backends:
            continue

        def ours_fwd(backend=backend):
            with torch.no_grad():
                out = vp.vocab_parallel_logprobs(
                    logits, targets, temperature=temperature, compute_entropy=True, backend=backend
                )
                return out.logprobs, out.entropy

        def ours_fwd_bwd(backend=backend):
            out = vp.vocab_parallel_logprobs(
                leaf, targets, temperature=temperature, compute_entropy=True, backend=backend
            )
            return torch.autograd.grad((out.logprobs * g_lp).sum() + (out.entropy * g_h).sum(), leaf)

        variants[name] = (ours_fwd, ours_fwd_bwd)
    return variants


def make_inputs(T, H, V, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(T, H, generator=g) * 1.0).to(device=device, dtype=torch.bfloat16)
    weight = (torch.randn(V, H, generator=g) * (2.0 / H**0.5)).to(device=device, dtype=torch.bfloat16)
    logits = hidden @ weight.t()  # [T, V] bf16, std ~2: a realistic spread
    targets = torch.randint(0, V, (T,), generator=g).to(device)
    g_lp = torch.randn(T, generator=g).to(device)
    g_h = torch.randn(T, generator=g).to(device)
    return dict(hidden=hidden, weight=weight, logits=logits, targets=targets, g_lp=g_lp, g_h=g_h)


# ----------------------------------------------------------------------------------------------------------
# correctness on the device (small T, full vocab, float64 reference) and agreement at full size
# ----------------------------------------------------------------------------------------------------------


def check_correctness(device, V, backends, temperature):
    inp = make_inputs(64, 256, V, device, seed=1)
    logits, targets, g_lp, g_h = inp["logits"], inp["targets"], inp["g_lp"], inp["g_h"]
    x = logits.double().requires_grad_()
    logp = torch.log_softmax(x / temperature, -1)
    ref_lp = logp.gather(-1, targets[:, None]).squeeze(-1)
    ref_h = -(logp.exp() * logp).sum(-1)
    (ref_g,) = torch.autograd.grad((ref_lp * g_lp).sum() + (ref_h * g_h).sum(), x)
    res = {}
    for name, backend in (("chunked", "torch"), ("triton", "triton")):
        if name not in backends:
            continue
        leaf = logits.detach().requires_grad_()
        out = vp.vocab_parallel_logprobs(
            leaf, targets, temperature=temperature, compute_entropy=True, backend=backend
        )
        (g,) = torch.autograd.grad((out.logprobs * g_lp).sum() + (out.entropy * g_h).sum(), leaf)
        res[name] = dict(
            logprobs_max_abs_err=(out.logprobs.double() - ref_lp).abs().max().item(),
            entropy_max_abs_err=(out.entropy.double() - ref_h).abs().max().item(),
            grad_max_abs_err=(g.double() - ref_g).abs().max().item(),
            grad_max_abs_ref=ref_g.abs().max().item(),
        )
    return res


# ----------------------------------------------------------------------------------------------------------


def device_slug(device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    m = re.search(r"(H100|H200|A100|B200|GH200|L40S|L4|A10G)", name)
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # pin glibc's mmap threshold so that freed large buffers leave RSS (else peak RSS under-reports)
        os.execve(
            sys.executable, [sys.executable, *sys.argv], dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        )
    size = SIZES[args.size]
    T, H, V = size["T"], size["H"], size["V"]
    repeats = args.repeats or (5 if args.size == "qwen3" else 10)
    backends = ["chunked"] + (["triton"] if device.type == "cuda" and vp._HAS_TRITON else [])
    torch.manual_seed(0)

    env = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        triton=getattr(vp.triton, "__version__", None) if vp._HAS_TRITON else None,
        cpu_threads=torch.get_num_threads(),
        size=args.size,
        T=T,
        H=H,
        V=V,
        temperature=args.temperature,
        repeats=repeats,
        command=" ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
    )
    print(json.dumps(env))
    correctness = check_correctness(device, V, backends, args.temperature)
    print("correctness vs float64 (T=64, full V):", json.dumps(correctness))

    rows = []
    for shard_name, v_shard in (("tp1", V), ("tp4_shard", V // 4)):
        inp = make_inputs(T, H, v_shard, device)
        logits = inp["logits"]
        grad_bytes = logits.numel() * logits.element_size()
        variants = make_variants(inp, args.temperature, backends)
        agree = {}
        for name, (fwd, fwd_bwd) in variants.items():
            row = dict(shard=shard_name, V_shard=v_shard, variant=name)
            row["fwd_ms"] = time_ms(fwd, device, 2, repeats)
            row["fwd_extra_mib"] = peak_extra_bytes(fwd, device) / MIB
            row["fwd_bwd_ms"] = time_ms(fwd_bwd, device, 2, repeats)
            extra = peak_extra_bytes(fwd_bwd, device)
            row["fwd_bwd_extra_mib"] = extra / MIB
            row["fwd_bwd_extra_excl_grad_mib"] = (extra - grad_bytes) / MIB if name != "matmul" else None
            rows.append(row)
            print(json.dumps(row))
            if name in ("eager_fp32", "chunked", "triton"):
                lp, ent = fwd()
                (g,) = fwd_bwd()
                agree[name] = (lp, ent, g)
            gc.collect()
        # agreement of ours with eager fp32 at full size
        if "eager_fp32" in agree:
            lp0, ent0, g0 = agree.pop("eager_fp32")
            for name, (lp, ent, g) in agree.items():
                d = dict(
                    logprobs=(lp - lp0).abs().max().item(),
                    entropy=(ent - ent0).abs().max().item(),
                    grad=(g.float() - g0.float()).abs().max().item(),
                )
                correctness.setdefault("full_size_max_abs_diff_vs_eager_fp32", {})[f"{shard_name}/{name}"] = d
        del inp, variants, agree, logits
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    mm = {r["shard"]: r for r in rows if r["variant"] == "matmul"}
    for r in rows:
        r["fwd_over_matmul_fwd"] = r["fwd_ms"] / mm[r["shard"]]["fwd_ms"]
        r["fwd_bwd_over_matmul_fwd"] = r["fwd_bwd_ms"] / mm[r["shard"]]["fwd_ms"]
        r["fwd_bwd_over_matmul_fwd_bwd"] = r["fwd_bwd_ms"] / mm[r["shard"]]["fwd_bwd_ms"]

    slug = device_slug(device)
    os.makedirs(args.out, exist_ok=True)
    result = dict(env=env, correctness=correctness, rows=rows)
    with open(os.path.join(args.out, f"logprob_{slug}.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = render_md(env, correctness, rows)
    with open(os.path.join(args.out, f"logprob_{slug}.md"), "w") as f:
        f.write(md)
    print(md)


def render_md(env, correctness, rows) -> str:
    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    lines = [
        f"# log-prob + entropy bench: {env['device']} ({env['size']}: T={env['T']}, H={env['H']}, V={env['V']})",
        "",
        f"torch {env['torch']}, triton {env['triton']}, temperature {env['temperature']}, "
        f"median of {env['repeats']}; command: `{env['command']}`",
        "",
        "| shard | variant | fwd ms | fwd extra MiB | fwd+bwd ms | fwd+bwd extra MiB | excl. grad MiB "
        "| fwd / mm fwd | fwd+bwd / mm fwd | fwd+bwd / mm fwd+bwd |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shard']} (V={r['V_shard']}) | {r['variant']} | {f(r['fwd_ms'])} | {f(r['fwd_extra_mib'], '{:.0f}')} "
            f"| {f(r['fwd_bwd_ms'])} | {f(r['fwd_bwd_extra_mib'], '{:.0f}')} "
            f"| {f(r['fwd_bwd_extra_excl_grad_mib'], '{:.0f}')} | {f(r['fwd_over_matmul_fwd'])} "
            f"| {f(r['fwd_bwd_over_matmul_fwd'])} | {f(r['fwd_bwd_over_matmul_fwd_bwd'])} |"
        )
    lines += [
        "",
        "Correctness (max abs error; T=64 vs float64 on the full vocab, and at full size vs eager fp32):",
        "",
    ]
    lines += ["```", json.dumps(correctness, indent=1), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
