"""The chunked engine never allocates anything of size M x N: peak extra memory is measured in a
fresh process (glibc keeps freed heap, so in-process numbers would be polluted by earlier tests)."""
import pytest

import sessions

PROBE = """
    import sys, torch, fastcl
    loss_name, backend, n, d = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    x = torch.randn(n, d, requires_grad=True)
    y = torch.randn(n, d, requires_grad=True)
    args = {"clip": (x, y, 10.0), "siglip": (x, y, 10.0, -5.0)}[loss_name]
    fn = {"clip": fastcl.clip_loss, "siglip": fastcl.siglip_loss}[loss_name]
    fn(*args, backend=backend).backward()  # warm-up: lazy initialisation is not the loss's memory
    x.grad = y.grad = None
    def step():
        fn(*args, backend=backend).backward()
        return 0
"""


def peak_extra_bytes(loss: str, backend: str, n: int, d: int) -> int:
    return sessions.peak_extra_bytes(PROBE, loss, backend, n, d)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_chunked_peak_memory_is_far_below_the_similarity_matrix(loss):
    n, d = 6144, 32
    similarity_bytes = n * n * 4  # one float32 S: 144 MiB
    chunked = peak_extra_bytes(loss, "chunked", n, d)
    reference = peak_extra_bytes(loss, "reference", n, d)
    assert reference > similarity_bytes, "the probe should see the reference materialise S"
    assert chunked < similarity_bytes / 4, f"chunked used {chunked / 2**20:.1f} MiB"
