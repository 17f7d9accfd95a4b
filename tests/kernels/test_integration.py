"""The kernels inside the models: a streaming VAE decode with `install` equals PyTorch's."""

import torch

from wan_rt.config import get_spec
from wan_rt.metrics import relative_error


def test_install_puts_conv_kernel_into_the_vae_stream(spy_launches):
    from wan_rt.kernels import causal_conv, install
    from wan_rt.models.vae import WanVAE

    spec = get_spec("tiny-t2v-A14B")
    torch.manual_seed(0)
    reference = WanVAE(spec.vae).eval()
    fast = WanVAE(spec.vae).eval()
    fast.load_state_dict(reference.state_dict())
    assert install(fast) > 0
    launches = spy_launches(causal_conv, "_causal_conv3d_kernel")
    z = torch.randn(1, spec.vae.z_dim, 2, 2, 2)  # two latent frames: the first chunk and a steady one
    with torch.no_grad():
        want, got = reference.decode(z), fast.decode(z)
    assert got.shape == want.shape == (1, 3, 5, 16, 16)
    assert launches["_causal_conv3d_kernel"] > 10, "the decoder's convs must run on the Triton kernel"
    assert relative_error(got, want) < 1e-4
