"""Compiles every fastmim Triton kernel to PTX for an H100 (sm_90) without a GPU, for each specialisation the
launchers use: catches code that Triton's interpreter accepts but the compiler rejects.

    python tests/ops/compile_kernels.py        # TRITON_INTERPRET must be unset (the interpreter replaces @jit)

Prints one line per kernel and exits 1 if any fails to compile.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: under the interpreter @triton.jit functions cannot be compiled")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastmim.masking import triton_block  # noqa: E402
from fastmim.ops.triton import (  # noqa: E402
    attention,
    bias_gelu,
    fft_loss,
    grn,
    hog,
    layer_norm,
    low_pass,
    masked_loss,
    patch_fft_loss,
    patchify,
    resized_crop,
    sparse_conv,
    tokens,
)

TARGET = GPUTarget("cuda", 90, 32)


def specs():
    """(kernel, pointer element types by argument, constexprs): every combination the launchers can produce."""
    for dt in ("fp32", "bf16", "fp16"):
        yield (
            tokens._gather_rows_kernel,
            {"x_ptr": dt, "ids_ptr": "i64", "out_ptr": dt},
            {"BLOCK_K": 4, "BLOCK_D": 1024},
        )
        for ids in ("i64", "i32"):
            ptrs = {"g_ptr": dt, "ids_ptr": ids, "out_ptr": dt}
            yield tokens._put_rows_kernel, ptrs, {"BLOCK_K": 4, "BLOCK_D": 1024}
    for has_pos, has_cls, (x, p) in itertools.product(
        (True, False), (True, False), (("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32"))
    ):
        out = "fp32" if "fp32" in (x, p) else x
        ptrs = {"x_ptr": x, "ids_ptr": "i64", "mt_ptr": p, "pos_ptr": p, "cls_ptr": x, "out_ptr": out}
        yield (
            tokens._scatter_masked_kernel,
            ptrs,
            {"HAS_POS": has_pos, "HAS_CLS": has_cls, "BLOCK_R": 8, "BLOCK_D": 512},
        )
        ptrs = {"g_ptr": out, "ids_ptr": "i64", "gx_ptr": x, "gmt_ptr": "fp32", "gpos_ptr": "fp32"}
        consts = {"HAS_CLS": has_cls, "NEED_POS": has_pos, "B_CHUNK": 8, "BLOCK_R": 4, "BLOCK_D": 512}
        yield tokens._scatter_masked_bwd_kernel, ptrs, consts
    pairs = (("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32"))  # autocast, fp16 throughout, fp32 throughout
    for norm_pix, p_norm, (pred, tgt) in itertools.product((True, False), (1, 2), pairs):
        ptrs = {"pred_ptr": pred, "tgt_ptr": tgt, "mask_ptr": "fp32", "part_ptr": "fp32", "gl_ptr": "fp32",
                "denom_ptr": "fp32", "grad_ptr": pred}  # fmt: skip
        # MAE's 16x16 RGB patches from images, and patchified targets (P=1, C=D); int64 offsets for huge samples
        for geo in (
            {"P": 16, "C": 3, "WIDE": False},
            {"P": 1, "C": 768, "WIDE": False},
            {"P": 16, "C": 3, "WIDE": True},
        ):
            consts = {**geo, "NORM_PIX": norm_pix, "P_NORM": p_norm, "BLOCK_P": 4, "BLOCK_D": 1024}
            yield masked_loss._masked_loss_fwd_kernel, ptrs, consts
            yield masked_loss._masked_loss_bwd_kernel, ptrs, consts
    for to_patches, dt in itertools.product((True, False), ("fp32", "bf16")):
        consts = {"TO_PATCHES": to_patches, "BLOCK_C": 4, "BLOCK_W": 256}
        yield patchify._patch_copy_kernel, {"img_ptr": dt, "pat_ptr": dt}, consts
        for wide in (False, True):
            consts = {"P": 16, "C": 3, "TO_PATCHES": to_patches, "WIDE": wide, "BLOCK": 1024}
            yield patchify._patch_flat_kernel, {"img_ptr": dt, "pat_ptr": dt}, consts
    # sparse_dwconv (ConvNeXt's K=7): forward with bias in every dtype mix, without bias, grad_x (FLIP, no bias)
    fwd = [(False, True, x, w) for x, w in (("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"))]
    fwd += [(False, False, "fp32", "fp32"), (True, False, "bf16", "fp32"), (True, False, "fp16", "fp16")]
    for flip, has_bias, x, w in fwd:
        ptrs = {"x_ptr": x, "nbr_ptr": "i32", "w_ptr": w, "b_ptr": w, "out_ptr": x}
        consts = {"K": 7, "FLIP": flip, "HAS_BIAS": has_bias, "BLOCK_M": 32, "BLOCK_C": 64}
        yield sparse_conv._sparse_dwconv_kernel, ptrs, consts
    for k, dt in ((3, "fp32"), (7, "bf16")):
        ptrs = {"g_ptr": dt, "x_ptr": dt, "nbr_ptr": "i32", "part_ptr": "fp32"}
        consts = {"K": k, "BLOCK_M": 128, "BLOCK_C": 64}
        yield sparse_conv._sparse_dwconv_wgrad_kernel, ptrs, consts
    # grn: bf16 activations with fp32 parameters (autocast), fp16 throughout, fp32 throughout
    for x, w in (("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")):
        for grad in (False, True):
            consts = {"GRAD": grad, "BLOCK_N": 16 if grad else 32, "BLOCK_C": 128}
            yield grn._grn_stats_kernel, {"x_ptr": x, "g_ptr": x, "part_ptr": "fp32"}, consts
        ptrs = {"x_ptr": x, "part_ptr": "fp32", "w_ptr": w, "bias_ptr": w, "out_ptr": x}
        yield grn._grn_fwd_kernel, ptrs, {"BLOCK_N": 32, "BLOCK_C": 128, "BLOCK_R": 1024}
        for need_x in (True, False):
            ptrs = {"g_ptr": x, "x_ptr": x, "part_ptr": "fp32", "w_ptr": w, "dx_ptr": x, "d_ptr": "fp32"}
            yield grn._grn_bwd_kernel, ptrs, {"NEED_X": need_x, "BLOCK_N": 16, "BLOCK_C": 128, "BLOCK_R": 1024}
    for need_w, need_b in ((True, True), (True, False), (False, True)):
        ptrs = {"part_ptr": "fp32", "d_ptr": "fp32", "dw_ptr": "fp32", "db_ptr": "fp32"}
        yield grn._grn_param_grad_kernel, ptrs, {"NEED_W": need_w, "NEED_B": need_b, "BLOCK_C": 64}
    # add_layer_norm: the model under autocast (bf16 branch, fp32 stream and parameters, bf16 y), and uniform dtypes
    for x, r, y in (("bf16", "fp32", "bf16"), ("bf16", "bf16", "bf16"), ("fp16", "fp16", "fp16"), ("fp32",) * 3):
        ptrs = {"x_ptr": x, "r_ptr": r, "w_ptr": "fp32", "b_ptr": "fp32", "s_ptr": r, "y_ptr": y, "mean_ptr": "fp32",
                "rstd_ptr": "fp32"}  # fmt: skip
        for block, has_res in itertools.product((1024, 8192), (True, False)):
            yield layer_norm._add_ln_fwd_kernel, ptrs, {"HAS_RES": has_res, "BLOCK_C": block}
        ptrs = {"dy_ptr": y, "ds_ptr": r, "s_ptr": r, "w_ptr": "fp32", "mean_ptr": "fp32", "rstd_ptr": "fp32",
                "dr_ptr": r, "dx_ptr": x, "part_ptr": "fp32"}  # fmt: skip
        for has_ds, two in itertools.product((True, False), (x != r, False)):
            yield layer_norm._add_ln_bwd_kernel, ptrs, {"HAS_DS": has_ds, "TWO_OUT": two, "BLOCK_M": 4, "BLOCK_C": 1024}
    # bias_gelu: bf16 x with an fp32 bias (autocast), and x and bias alike
    for x, bias in (("bf16", "fp32"), ("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16")):
        yield bias_gelu._bias_gelu_fwd_kernel, {"x_ptr": x, "b_ptr": bias, "y_ptr": x}, {"BLOCK_M": 4, "BLOCK_N": 1024}
        ptrs = {"dy_ptr": x, "x_ptr": x, "b_ptr": bias, "dx_ptr": x, "part_ptr": "fp32"}
        yield bias_gelu._bias_gelu_bwd_kernel, ptrs, {"BLOCK_M": 8, "BLOCK_N": 256}
    # attention: bf16/fp16 (GPU matmuls in the input dtype) and fp32 (IEEE), head dims 32 and 64 (16 x 16 tiles for
    # the shortest sequences)
    for dt, prec in (("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "ieee")):
        for block, block_d in ((64, 32), (64, 64), (16, 16)):
            consts = {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_D": block_d, "UPCAST": False, "PRECISION": prec}
            yield attention._attn_fwd_kernel, {"qkv_ptr": dt, "o_ptr": dt, "lse_ptr": "fp32"}, consts
            ptrs = {"qkv_ptr": dt, "do_ptr": dt, "lse_ptr": "fp32", "delta_ptr": "fp32", "dqkv_ptr": dt}
            for dq in (False, True):
                yield attention._attn_bwd_kernel, ptrs, {**consts, "DQ": dq}
        yield attention._attn_delta_kernel, {"o_ptr": dt, "do_ptr": dt, "delta_ptr": "fp32"}, {"BLOCK_M": 64,
                                                                                             "BLOCK_D": 64}  # fmt: skip
    # ViT-H/14 (head dim 80) and ViT-g/14 (104): bf16, padded to 128 with 8 warps (attention._config)
    ptrs = {"qkv_ptr": "bf16", "do_ptr": "bf16", "lse_ptr": "fp32", "delta_ptr": "fp32", "dqkv_ptr": "bf16"}
    consts = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 128, "UPCAST": False, "PRECISION": "tf32"}
    yield attention._attn_fwd_kernel, {"qkv_ptr": "bf16", "o_ptr": "bf16", "lse_ptr": "fp32"}, consts, {"num_warps": 8}
    for dq in (False, True):
        yield attention._attn_bwd_kernel, ptrs, {**consts, "DQ": dq}, {"num_warps": 8}
    # hog_target: MaskFeat's 8-px cells over RGB (with and without the Gaussian window and a mask), 4-px cells
    for dt in ("fp32", "bf16"):
        for window, has_mask, cell in ((0, True, 8), (16, True, 8), (0, False, 4)):
            ptrs = {"img_ptr": dt, "mask_ptr": "i8", "win_ptr": "fp32", "trig_ptr": "fp32", "out_ptr": "fp32"}
            consts = {"C": 3, "NBINS": 9, "CELL": cell, "BLOCK": cell, "K": 16 // cell, "WINDOW": window,
                      "HAS_MASK": has_mask}  # fmt: skip
            yield hog._hog_cell_kernel, ptrs, consts
    # fft_loss: A2MIM's bf16 reconstructions against fp32 images, with and without the token mask
    for pred, has_mask in (("bf16", True), ("fp32", False)):
        ptrs = {"pred_ptr": pred, "target_ptr": "fp32", "mask_ptr": "fp32", "e_ptr": "fp32"}
        yield fft_loss._fft_mix_mean_kernel, ptrs, {"HAS_MASK": has_mask, "BLOCK": 1024}
        ptrs = {"g_ptr": "fp32", "mask_ptr": "fp32", "dpred_ptr": pred, "dtarget_ptr": "fp32"}
        for need in ((True, False), (True, True)):
            consts = {"HAS_MASK": has_mask, "NEED_PRED": need[0], "NEED_TARGET": need[1], "BLOCK": 1024}
            yield fft_loss._fft_grad_kernel, ptrs, consts
    # patch_fft_loss: 16-px patches (bf16 and fp32 predictions), 5-px patches with alpha != 1 and plain weights
    for pred, p, alpha_one, log in (("bf16", 16, True, True), ("fp32", 16, True, True), ("fp32", 5, False, False)):
        ptrs = {"pred_ptr": pred, "img_ptr": "fp32", "mask_ptr": "fp32", "kr_ptr": "fp32", "ki_ptr": "fp32",
                "mult_ptr": "fp32", "rowmax_ptr": "fp32"}  # fmt: skip
        block_n = max(16, 1 << (p * p - 1).bit_length())
        consts = {"P": p, "P2": p * p, "H2": p * (p // 2 + 1), "BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": 16,
                  "ALPHA_ONE": alpha_one, "LOG": log, "PRECISION": "ieee"}  # fmt: skip
        ptrs.update(rowloss_ptr="fp32", scale_ptr="fp32", dpred_ptr=pred)
        for backward in (False, True):
            yield patch_fft_loss._pfft_kernel, ptrs, {**consts, "BACKWARD": backward}
    # low_pass_target's epilogue
    yield low_pass._magnitude_minus_kernel, {"ab_ptr": "fp32", "off_ptr": "fp32", "out_ptr": "fp32"}, {"BLOCK": 1024}
    # resized_crop: uint8 images (float on the 0-255 scale too), fp32 / bf16 / fp16 output
    for linear in (False, True):  # bicubic, bilinear
        consts = {"BLOCK_R": resized_crop._BLOCK_R, "BLOCK_X": resized_crop._BLOCK_X, "LINEAR": linear}
        for src in ("u8", "fp32"):
            yield resized_crop._resize_rows_kernel, {"src_ptr": src, "meta_ptr": "i64", "tmp_ptr": "fp32"}, consts
        for out in ("fp32", "bf16", "fp16"):
            ptrs = {"tmp_ptr": "fp32", "meta_ptr": "i64", "scale_ptr": "fp32", "shift_ptr": "fp32", "out_ptr": out}
            yield resized_crop._resize_cols_kernel, ptrs, consts
    # block masks: 14x14 with BEiT's 10 tries, and a 64x64 grid (the largest the launcher takes)
    for block, ablock in ((256, 16), (4096, 16)):
        ptrs = {"keys_ptr": "i64", "streams_ptr": "i64", "mask_ptr": "i8", "count_ptr": "i32", "params_ptr": "fp64"}
        consts = {"BLOCK": block, "ABLOCK": ablock, "MUL": triton_block._MUL, "GOLDEN": triton_block._GOLDEN}
        yield triton_block._block_mask_kernel, ptrs, consts


def signature(kernel, ptrs: dict, consts: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
        else:
            # sizes and strides as launches below 2^31 pass them
            sig[name] = "fp32" if name in ("eps", "scale", "qk_scale", "alpha") else "i32"
    return sig


_SPECS: list = []


def _compile(i: int) -> str:
    kernel, ptrs, consts, *options = _SPECS[i]  # options: the launch's (num_warps), where not the default
    options = options[0] if options else {}
    kernel = getattr(kernel, "jit_fn", kernel)  # fastmim's @jit_kernel wraps the triton.jit function
    what = f"{kernel.fn.__name__} {ptrs} {consts}" + (f" {options}" if options else "")
    try:
        triton.compile(ASTSource(kernel, signature(kernel, ptrs, consts), consts), target=TARGET, options=options)
        return "ok   " + what
    except Exception as e:  # report every kernel, then fail
        return f"FAIL {what} {type(e).__name__}: {e}"


def main() -> int:
    _SPECS[:] = specs()
    # one process per core (forked: they inherit the kernels): the compiles are independent and CPU-bound
    workers = max(1, min(len(os.sched_getaffinity(0)), 8))
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        lines = pool.map(_compile, range(len(_SPECS)), chunksize=1)
    print("\n".join(lines))
    failed = sum(line.startswith("FAIL") for line in lines)
    print(f"{failed} failed" if failed else "all kernels compile for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
