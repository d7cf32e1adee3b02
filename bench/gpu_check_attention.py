"""The GPU check's attention comparison (bench/gpu_check.py --attention both): one micro-batch, the
same weights, a training forward + backward through the flash path and through SDPA; every loss
part and the projector's gradient compared, with the tolerances below.

The flash path runs the batch as training does on a GPU: packed into one row, the collate's
segment boundaries handed to the varlen kernel. SDPA runs the padded batch, which needs no mask
beyond causal + padding: a wrong boundary, position id or GQA head mapping on the flash side moves
the loss by whole units and turns the gradient, where kernel rounding moves them by per mille.
"""
from __future__ import annotations

import dataclasses

import torch

# |flash - sdpa| <= atol + rtol·|sdpa|. bf16 keeps 8 significant bits (2^-9 ≈ 0.2% per rounding);
# flash's online softmax and SDPA accumulate in other orders over 16 layers: 1% for the loss
# parts, as for packed vs padded. The gradient is a sum over every token of products through all
# layers and the backward kernels round again: 5% on its norm, and its direction (cosine) >= 0.99.
# fp32 (CPU) rounds at 2^-24: the bounds shrink by orders of magnitude.
@dataclasses.dataclass(frozen=True)
class Tolerance:
    loss_rtol: float
    loss_atol: float
    grad_norm_rtol: float
    min_grad_cosine: float


TOLERANCES = {torch.bfloat16: Tolerance(1e-2, 1e-2, 5e-2, 0.99),
              torch.float32: Tolerance(1e-4, 1e-5, 1e-3, 0.9999)}
PARTS = ("loss", "lm", "align", "pair")


@dataclasses.dataclass(frozen=True)
class Measured:
    parts: dict[str, float]      # PARTS -> value
    grad: torch.Tensor           # the projector's full gradient, flattened (fp32)


def within(value: float, reference: float, rtol: float, atol: float = 0.0) -> bool:
    return abs(value - reference) <= atol + rtol * abs(reference)


def compare(flash: Measured, sdpa: Measured, tol: Tolerance) -> list[tuple[str, float, float, str, bool]]:
    """(quantity, sdpa value, flash value, bound, within) per loss part, the gradient norm and the
    gradients' cosine."""
    rows = [(part, sdpa.parts[part], flash.parts[part], f"<= {tol.loss_atol:g} + {tol.loss_rtol:g} x |sdpa|",
             within(flash.parts[part], sdpa.parts[part], tol.loss_rtol, tol.loss_atol)) for part in PARTS]
    norms = float(sdpa.grad.norm()), float(flash.grad.norm())
    rows.append(("projector grad norm", *norms, f"<= {tol.grad_norm_rtol:g} x |sdpa|",
                 norms[0] > 0 and within(norms[1], norms[0], tol.grad_norm_rtol)))
    cosine = float(torch.nn.functional.cosine_similarity(flash.grad, sdpa.grad, dim=0))
    rows.append(("projector grad cosine", 1.0, cosine, f">= {tol.min_grad_cosine:g}", cosine >= tol.min_grad_cosine))
    return rows


def measure(engine, batch, targets, tga_cfg) -> Measured:
    """A training forward + backward of `batch`; the gradient is read back (ZeRO-3 keeps it
    partitioned) and dropped, so the weights stay as they were."""
    from deepspeed.utils import safe_get_full_grad

    from pipeline.train.step import tga_forward

    loss, parts = tga_forward(engine, batch, targets, 0.0, tga_cfg)
    engine.backward(loss)
    projector = engine.module.model.multi_modal_projector.parameters()
    grad = torch.cat([safe_get_full_grad(p).float().flatten() for p in projector]).cpu()
    # the optimizer's zero_grad, not the engine's: ZeRO-3 would add the next backward's partitions to these
    engine.optimizer.zero_grad()
    return Measured({"loss": float(loss.detach()), **{k: float(parts[k]) for k in PARTS[1:]}}, grad)


def towers_attention(model) -> dict[str, str]:
    """The attention of the Llava model and of each tower, in `set_attn_implementation`'s dict form."""
    config = model.config
    return {"": config._attn_implementation, "text_config": config.text_config._attn_implementation,
            "vision_config": config.vision_config._attn_implementation}


def check_flash_equals_sdpa(engine, batches: dict, targets, tga_cfg, flash: str, dtype: torch.dtype) -> bool:
    """`flash` on the packed single row against SDPA on the padded batch, same weights; prints the
    table and returns whether every row is within its bound. The flash side runs the towers as
    `build_llava` set them up when it chose `flash`; otherwise (eager, the CPU stand-in) `flash` runs in
    every tower. The model is left as it was built."""
    tol, model = TOLERANCES[dtype], engine.module
    built = towers_attention(model)
    try:
        if built["text_config"] != flash:
            model.set_attn_implementation(flash)
        candidate = measure(engine, batches["flash row"], targets, tga_cfg)
        model.set_attn_implementation("sdpa")
        sdpa = measure(engine, batches["padded"], targets, tga_cfg)
    finally:
        model.set_attn_implementation(built)
    rows = compare(candidate, sdpa, tol)
    print(f"{flash} (packed, one row) vs sdpa (padded), forward + backward on the same weights "
          f"({str(dtype).removeprefix('torch.')}):")
    for name, reference, value, bound, ok in rows:
        print(f"  {name:22s} sdpa {reference:12.6g}  {flash} {value:12.6g}  |diff| {abs(value - reference):.1e}  "
              f"{bound:28s} {'ok' if ok else 'OUT OF TOLERANCE'}")
    equal = all(ok for *_, ok in rows)
    print(f"  {flash} = sdpa: {'yes' if equal else 'NO'}")
    return equal
