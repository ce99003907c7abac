"""The Triton kernels compile for Hopper (sm_90) ahead of time, on a machine without a GPU.

The interpreter checks what the kernels compute; this checks that the compiled path accepts
them (types, layouts, shared memory): BatchAugment's crop, colour and blur kernels in each variant, and
the loss kernels, whose dots must lower to Hopper's wgmma, for the first
configuration of each width's table, as the JIT would specialise them (16-byte aligned
pointers, sizes divisible by 16). It runs in a subprocess because the kernel tests may have put
this process's triton into interpreter mode.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from suncet.data import augment_triton as at
from suncet.kernels import triton_kernels as tk
from suncet.kernels import triton_tiles as tiles

ATTRIBUTES = ("q_ptr k_ptr row_keys_ptr col_keys_ptr row_groups_ptr col_groups_ptr partial_ptr loss_ptr valid_ptr "
              "stats_ptr dq_ptr dk_ptr tickets_ptr grad_ptr gmean0_ptr gmean1_ptr").split()


def compile_one(kernel, table, types, constants):
    fn = kernel.fn
    while not isinstance(fn, JITFunction):  # through the autotuner and heuristics wrappers
        fn = fn.fn
    block_m, block_n, warps, stages = table[128 if constants["BLOCK_D"] <= 128 else 256][0]
    constants = {**constants, "BLOCK_M": block_m, "BLOCK_N": block_n}
    aligned = [n for n in types if n in ATTRIBUTES or (n == "D" and constants["EVEN_D"])]
    source = ASTSource(
        fn=fn,
        signature={**types, **{name: "constexpr" for name in constants}},
        constexprs=constants,
        attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    options = {"num_warps": warps, "num_stages": stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    return "wgmma" in compiled.asm["ptx"]


def forward_types(dt):
    return dict(q_ptr=dt, k_ptr=dt, row_keys_ptr="*i64", col_keys_ptr="*i64", row_groups_ptr="*i64",
                col_groups_ptr="*i64", partial_ptr="*fp32", loss_ptr="*fp32", valid_ptr="*i1", stats_ptr="*fp32",
                M="i32", N="i32", D="i32", self_offset="i32", scale2="fp32", ROWS_BUCKET="i32", COLS_BUCKET="i32")


def backward_types(dt):
    return dict(q_ptr=dt, k_ptr=dt, dq_ptr=dt, dk_ptr=dt, partial_ptr="*fp32", tickets_ptr="*i32", grad_ptr="*fp32",
                gmean0_ptr="*fp32", gmean1_ptr="*fp32", stats_ptr="*fp32", row_keys_ptr="*i64", col_keys_ptr="*i64",
                row_groups_ptr="*i64", col_groups_ptr="*i64", M="i32", N="i32", D="i32", self_offset="i32",
                boundary="i32", scale2="fp32", inv_tau="fp32", ROWS_BUCKET="i32", COLS_BUCKET="i32")


def compile_augment(fn, types, constants):
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    source = ASTSource(fn=fn, signature={**types, **{name: "constexpr" for name in constants}}, constexprs=constants,
                       attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in types if n.endswith("_ptr")})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 1})
    return "ld.global" in compiled.asm["ptx"]


results = {}
CHANNEL_CONSTANTS = dict(m0="fp32", m1="fp32", m2="fp32", s0="fp32", s1="fp32", s2="fp32")
results["crop rows"] = compile_augment(
    at._crop_rows_kernel, dict(images_ptr="*u8", params_ptr="*fp32", rows_ptr="*fp32", C="i32", H="i32", W="i32", S="i32"),
    dict(TAPS=at._taps(256, 224), BLOCK=at._PIXELS))
results["crop columns"] = compile_augment(
    at._crop_columns_kernel, dict(rows_ptr="*fp32", params_ptr="*fp32", out_ptr="*fp32", C="i32", W="i32", S="i32"),
    dict(TAPS=at._taps(256, 224), BLOCK=at._PIXELS))
for channels in (1, 3):
    results[f"contrast sums C={channels}"] = compile_augment(
        at._contrast_sums_kernel, dict(x_ptr="*fp32", params_ptr="*fp32", partial_ptr="*fp32", HW="i32", chunks="i32"),
        dict(C=channels, BLOCK=at._PIXELS))
    for jitter, gray, solarize, normalise in ((True, True, True, True), (True, True, False, False), (False, False, False, True)):
        results[f"colour C={channels} jitter={jitter} gray={gray} solarize={solarize} normalise={normalise}"] = (
            compile_augment(at._color_kernel, dict(x_ptr="*fp32", params_ptr="*fp32", partial_ptr="*fp32",
                                                   out_ptr="*fp32", HW="i32", chunks="i32", **CHANNEL_CONSTANTS),
                            dict(C=channels, JITTER=jitter, GRAY=gray and channels == 3, SOLARIZE=solarize,
                                 NORMALIZE=normalise, BLOCK=at._PIXELS, CHUNKS=64)))
for along_h, finish in ((False, False), (True, True)):
    results[f"blur along_h={along_h} solarize/normalise={finish}"] = compile_augment(
        at._blur_kernel, dict(x_ptr="*fp32", params_ptr="*fp32", out_ptr="*fp32", H="i32", W="i32", **CHANNEL_CONSTANTS),
        dict(C=3, TAPS=23, ALONG_H=along_h, SOLARIZE=finish, NORMALIZE=finish, BLOCK=at._PIXELS))
for dt, sets, bounded, block_d, even, stats, check_k in (
    ("*bf16", 2, True, 128, True, 4, False), ("*bf16", 1, False, 128, True, 1, True),
    ("*fp32", 2, False, 256, False, 2, True), ("*fp32", 1, True, 256, False, 1, False),
):
    name = f"forward {dt[1:]} P={sets} bounded={bounded} BLOCK_D={block_d} stats={stats} check_k={check_k}"
    results[name] = compile_one(tk.forward_kernel, tiles.FORWARD_TABLE, forward_types(dt),
                                dict(P=sets, BOUNDED=bounded, INVERSE=bounded and block_d <= 128, STATS=stats,
                                     CHECK_K=check_k, BLOCK_D=block_d, EVEN_D=even, PRECISION="tf32", EVEN_N=even))
for dt, sets, bounded, block_d, even, two_sides, mean, stats in (
    ("*bf16", 2, True, 128, True, False, 1, 4),
    ("*bf16", 2, False, 128, True, False, 2, 2),
    ("*fp32", 1, True, 64, True, True, 0, 1),
    ("*bf16", 2, False, 256, False, True, 0, 2),
    ("*bf16", 1, True, 128, False, True, 2, 2),
):
    name = f"backward {dt[1:]} P={sets} bounded={bounded} BLOCK_D={block_d} two_sides={two_sides} mean={mean}"
    table = tiles.BOUNDED_BACKWARD_TABLE if bounded else tiles.BACKWARD_TABLE
    results[name] = compile_one(tk.backward_kernel, table, backward_types(dt),
                                dict(P=sets, TWO_SIDES=two_sides, SYMMETRIC=not two_sides, BOUNDED=bounded,
                                     STATS=stats, MEAN=mean, BLOCK_D=block_d,
                                     EVEN_D=even, PRECISION="tf32", EVEN_N=even))
results["finish merge+means P=2"] = compile_augment(
    tk.finish_kernel, dict(partial_ptr="*fp32", loss_ptr="*fp32", valid_ptr="*i1", stats_ptr="*fp32",
                           block_sums_ptr="*fp32", ticket_ptr="*i32", mean0_ptr="*fp32", mean1_ptr="*fp32",
                           M="i32", splits="i32", boundary="i32"),
    dict(P=2, INVERSE=True, STATS=4, MERGE=True, MEANS=True, BLOCK=tiles.FINISH_BLOCK))
print(json.dumps(results))
"""


def test_triton_kernels_compile_for_sm90():
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton with its NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # From this file's folder, so that `python -c` does not put the repository's unbuilt suncet/
    # first on the path.
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        cwd=os.path.dirname(__file__),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results and all(results.values()), f"not compiled as expected (loss dots to wgmma): {results}"
