"""Ahead-of-time compilation of every Triton kernel in masa_kernels/ for the GPUs this project runs on
(sm_90a: H100/H200, sm_80: A100), on any machine: no GPU needed.

    python -m masa_kernels.aot      # compiles each kernel variant for each target; prints a table and
                               # exits 1 on a compile error or a register spill

Why: the tests run the kernels under TRITON_INTERPRET=1, which executes them with NumPy and accepts
code the real compiler rejects; it also says nothing of registers or spills. Here each kernel goes
through Triton's real pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) for each target, and the
PTX goes through ptxas (the one Triton's wheel ships for that target) with -v, for registers and spill bytes.
Run it in a process without TRITON_INTERPRET (tests/test_kernels.py does).

VARIANTS lists each kernel with the argument types and compile-time constants it is launched with:
when a launch site changes, change its line here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

TARGETS = {"sm_90a": 90, "sm_80": 80}


def variants() -> list[tuple[str, object, dict, dict, int]]:
    """(name, jit function, signature, constants, num_warps) for every launch configuration."""
    from masa_kernels import advantage, logprobs, paged_attention, sampling

    out = []
    for dtype in ("fp32", "bf16"):
        out.append((f"logprobs forward, {dtype} logits", logprobs._forward_kernel,
                    {"logits_ptr": f"*{dtype}", "targets_ptr": "*i64", "logprob_ptr": "*fp32", "entropy_ptr": "*fp32",
                     "max_ptr": "*fp32", "logsum_ptr": "*fp32", "stride": "i32", "V": "i32",
                     "inv_temperature": "fp32", "BLOCK": "constexpr"}, {"BLOCK": logprobs.BLOCK_V}, 8))
        out.append((f"logprobs backward, {dtype} logits", logprobs._backward_kernel,
                    {"logits_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "targets_ptr": "*i64", "entropy_ptr": "*fp32",
                     "max_ptr": "*fp32", "logsum_ptr": "*fp32", "grad_logprob_ptr": "*fp32",
                     "grad_entropy_ptr": "*fp32", "stride": "i32", "grad_stride": "i32", "V": "i32",
                     "inv_temperature": "fp32", "BLOCK": "constexpr"}, {"BLOCK": logprobs.BLOCK_V}, 8))
    out.append(("group advantages, G = 16", advantage._group_advantages_kernel,
                {"rewards_ptr": "*fp32", "out_ptr": "*fp32", "G": "i32", "eps": "fp32", "BLOCK": "constexpr"},
                {"BLOCK": 16}, 4))
    # Qwen3 0.6B-14B: head_dim 128, 8 key-value heads, 2 (0.6B, 1.7B), 4 (4B, 8B) or 5 (14B) query heads each
    for dtype in ("bf16", "fp32"):
        for rep in (2, 4, 5):
            out.append((f"paged decode attention, {dtype}, D 128, rep {rep}", paged_attention._paged_decode_kernel,
                        {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "table_ptr": "*i32",
                         "lens_ptr": "*i32", "acc_ptr": "*fp32", "ml_ptr": "*fp32", "stride_qb": "i32",
                         "stride_qh": "i32", "stride_kb": "i32", "stride_kh": "i32", "stride_kp": "i32",
                         "stride_tb": "i32", "blocks_per_split": "i32", "scale": "fp32", "REP": "constexpr",
                         "REP_PAD": "constexpr", "D": "constexpr", "D_PAD": "constexpr", "BS": "constexpr",
                         "PRECISION": "constexpr"},
                        {"REP": rep, "REP_PAD": 16, "D": 128, "D_PAD": 128, "BS": paged_attention.BLOCK_SIZE,
                         "PRECISION": "ieee" if dtype == "fp32" else "tf32"}, 4))
        out.append((f"paged decode combine, {dtype}", paged_attention._combine_kernel,
                    {"acc_ptr": "*fp32", "ml_ptr": "*fp32", "out_ptr": f"*{dtype}", "stride_ob": "i32",
                     "stride_oh": "i32", "H": "i32", "splits": "i32", "D": "constexpr", "D_PAD": "constexpr",
                     "SPLITS_PAD": "constexpr"}, {"D": 128, "D_PAD": 128, "SPLITS_PAD": 16}, 4))
    for dtype in ("bf16", "fp32"):
        out.append((f"sampling, {dtype} logits", sampling._sample_kernel,
                    {"logits_ptr": f"*{dtype}", "streams_ptr": "*i64", "samples_ptr": "*i64", "positions_ptr": "*i64",
                     "token_ptr": "*i64", "logprob_ptr": "*fp32", "stride": "i32", "V": "i32",
                     "inv_temperature": "fp32", "seed": "i64", "BLOCK": "constexpr"}, {"BLOCK": sampling.BLOCK_V}, 8))
    return out


def ptxas_report(ptx: str, arch: str, capability: int) -> dict:
    """Registers and spill bytes of a kernel's PTX, from `ptxas -v` (the ptxas Triton itself uses for
    this target: its wheel ships one for sm_80 and a newer one for sm_90 and up)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([str(ptxas), "-v", f"--gpu-name={arch}", str(source), "-o", str(Path(tmp) / "k.cubin")],
                                capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"ptxas failed for {arch}:\n{result.stderr[-2000:]}")
    text = result.stderr + result.stdout
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"registers": int(registers[1]) if registers else None,
            "spill_bytes": int(spills[1]) + int(spills[2]) if spills else 0}


def compile_all() -> list[dict]:
    """Compile every variant for every target; one row each (an `error` key when it failed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for name, fn, signature, constants, warps in variants():
        for arch, capability in TARGETS.items():
            row = {"kernel": name, "target": arch}
            try:
                source = ASTSource(fn=fn, signature=signature, constexprs=constants)
                compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                          options={"num_warps": warps})
                row["shared_bytes"] = compiled.metadata.shared
                row.update(ptxas_report(compiled.asm["ptx"], arch, capability))
            except Exception as e:  # noqa: BLE001 (report every failure, not just the first)
                row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            rows.append(row)
    return rows


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    rows = compile_all()
    print("| kernel | target | registers | shared memory (bytes) | spilled bytes | result |")
    print("|---|---|---|---|---|---|")
    failed = 0
    for r in rows:
        bad = "error" in r or r["spill_bytes"]
        failed += bool(bad)
        result = r.get("error", "spills") if bad else "ok"
        print(f"| {r['kernel']} | {r['target']} | {r.get('registers', '')} | {r.get('shared_bytes', '')} | "
              f"{r.get('spill_bytes', '')} | {result} |")
    print(f"{len(rows) - failed} of {len(rows)} compiled without spills")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
