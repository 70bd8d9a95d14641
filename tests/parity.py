"""Test-side helpers around osp.testing's parity rule."""
import torch

from osp.testing import ATOL, parity  # noqa: F401  (ATOL re-exported for tests)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Dtypes every parity test covers: the interpreter rounds bfloat16 wrongly, so bf16 runs on GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def assert_parity(out, ref64, torch_out, name="out"):
    """Assert DESIGN.md's rule: max|out-ref64| <= 2*max|torch_out-ref64| + floor, and no NaN."""
    p = parity(out, ref64, torch_out)
    assert not p.nan, f"{name}: NaN in output (an element was never written?)"
    assert p.ok, (
        f"{name}: max|out-ref|={p.err:.3e} > bound {p.bound:.3e} (torch in {out.dtype}: {p.torch_err:.3e}); "
        f"||out-ref||/||ref||={p.rel:.3e}"
    )
    return p
