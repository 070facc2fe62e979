"""The linear-attention Triton kernels compile for an H100/H200 (sm_90) on this CPU-only machine.

The interpreter (TRITON_INTERPRET=1, every other CPU test) runs the kernels as Python and accepts code
the compiler refuses (jit helpers' argument kinds, constexpr use, shapes of dots). Triton's own compiler
and its bundled ptxas need no GPU, so each kernel is compiled here to a cubin at the settings training
uses: bf16 tensors (and fp32 for the backward, whose exact dots compile apart), H = 32, d = 128, decays, an
incoming state, the warps and stages the launches pass. The compile runs in a subprocess without TRITON_INTERPRET
(under it the kernels are interpreted functions, which do not compile). Each kernel's shared memory must fit an
H100/H200 block (227 KiB): the compiler accepts more, and only the launch on the GPU would refuse it.
"""

import inspect
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

import torch

from longloom.attention.triton_linear_blocks import BlockLaunch

BF16, FP32 = "*bf16", "*fp32"
SM90_MAX_SHARED_BYTES = 227 * 1024
LAUNCH = BlockLaunch()
SHAPE = {"HEADS": 32, "DK": 128, "DV": 128, "BLOCK": 64, "HAS_DECAY": True, "PRECISION": None}
BACKWARD_POINTERS = ("Q", "K", "V", "DO", "DQ", "DK_OUT", "DV_OUT", "STATES", "GRAD_STATES")

# name: (module, kernel, its constexprs beyond SHAPE, its pointer arguments' types, its launch's num_warps,
# whether the launch passes BlockLaunch's stages)
KERNELS = {
    "block states (reverse, incoming state)": (
        "triton_linear_blocks",
        "_block_states_kernel",
        {"BK": 64, "BV": 64, "HAS_INITIAL": True, "REVERSE": True},
        {"K": BF16, "V": BF16, "LOG_DECAY": FP32, "STATE_IN": FP32, "STATES": BF16, "FINAL": FP32},
        4,
        False,
    ),
    "block output": (
        "triton_linear_blocks",
        "_block_output_kernel",
        {"BK": 128, "BV": 64},
        {"Q": BF16, "K": BF16, "V": BF16, "O": BF16, "STATES": BF16, "LOG_DECAY": FP32},
        LAUNCH.output_warps,
        True,
    ),
    "block backward": (
        "triton_linear_blocks",
        "_block_backward_kernel",
        {"BK": 128, "BV": 128},
        {**dict.fromkeys(BACKWARD_POINTERS, BF16), "LOG_DECAY": FP32},
        LAUNCH.backward_warps_for(torch.bfloat16),
        True,
    ),
    "block backward, fp32 (ieee dots)": (
        "triton_linear_blocks",
        "_block_backward_kernel",
        {"BK": 128, "BV": 128, "PRECISION": "ieee"},
        dict.fromkeys((*BACKWARD_POINTERS, "LOG_DECAY"), FP32),
        LAUNCH.backward_warps_for(torch.float32),
        True,
    ),
    "scan (outputs and final state)": (
        "triton_linear",
        "_linear_scan_kernel",
        {
            "BK": 128,
            "BV": 64,
            "HAS_INITIAL": True,
            "STORE_OUTPUT": True,
            "STORE_FINAL": True,
            "REVERSE": False,
        },
        {"Q": BF16, "K": BF16, "V": BF16, "O": BF16, "STATE_IN": FP32, "STATE_OUT": FP32, "LOG_DECAY": FP32},
        4,
        False,
    ),
}


def compile_for_sm90(name: str) -> None:
    """Compiles kernel `name` to a cubin for sm_90; raises what the compiler raises."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, kernel_name, constexprs, pointers, num_warps, takes_stages = KERNELS[name]
    kernel = getattr(importlib.import_module(f"longloom.attention.{module}"), kernel_name)
    constexprs = {**SHAPE, **constexprs}
    parameters = list(inspect.signature(kernel.fn).parameters)
    # Every parameter not a pointer or a constexpr is an integer (lengths, counts, strides).
    signature = {p: "constexpr" if p in constexprs else pointers.get(p, "i32") for p in parameters}
    source = ASTSource(
        fn=kernel, signature=signature, constexprs={(parameters.index(k),): v for k, v in constexprs.items()}
    )
    options = {"num_warps": num_warps, **(LAUNCH.stage_settings() if takes_stages else {})}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.asm["cubin"], f"{name}: no cubin"
    assert ".target sm_90" in compiled.asm["ptx"]
    assert compiled.metadata.shared <= SM90_MAX_SHARED_BYTES, (
        f"{name} with {options} needs {compiled.metadata.shared} bytes of shared memory, more than an sm_90 block's"
        f" {SM90_MAX_SHARED_BYTES}: fewer stages or smaller tiles in its launch"
    )


@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_compiles_for_sm90(name, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile, never take a cached cubin
    result = subprocess.run(
        [sys.executable, __file__, name], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{name} did not compile for sm_90:\n{result.stderr[-3000:]}"


if __name__ == "__main__":
    compile_for_sm90(sys.argv[1])
