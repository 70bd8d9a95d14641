"""Parity rule of DESIGN.md: a kernel may be off the float64 reference by at most twice what
PyTorch's own computation in the same dtype is off, plus a small dtype floor."""
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Floor per dtype, relative to the reference's largest magnitude (at least 1).
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
# Dtypes every test covers: the interpreter rounds bfloat16 wrongly, so bf16 runs on GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def assert_parity(out, ref64, torch_out, name="out"):
    """out, torch_out: tensors in the tested dtype; ref64: the float64 reference."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output (an element was never written?)"
    ref64 = ref64.to(out.device)
    err = (out.double() - ref64).abs().max().item()
    torch_err = (torch_out.double().to(out.device) - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    bound = 2 * torch_err + ATOL[out.dtype] * scale
    rel = ((out.double() - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()
    assert err <= bound, (
        f"{name}: max|out-ref|={err:.3e} > bound {bound:.3e} (torch in {out.dtype}: {torch_err:.3e}); "
        f"||out-ref||/||ref||={rel:.3e}"
    )
    return err, rel
