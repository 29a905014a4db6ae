"""`trainers.sae_io.load_sae` on folders written by SAELens 6 itself: latents and reconstructions equal
SAELens' own `encode`/`decode` for both `apply_b_dec_to_input` settings and every architecture we read;
settings it does not implement are refused naming the cfg field. The topk miner's in-place ReLU
encoder follows the same setting."""

import json

import pytest
import torch

from saev_store.errors import UserError
from trainers.sae_io import load_sae

pytestmark = pytest.mark.slow  # importing sae_lens takes several seconds

D_IN, D_SAE = 12, 40


def _saelens_folder(dpath, arch: str, apply_b_dec: bool, **cfg_extra):
    import sae_lens

    cfg_cls = {"standard": sae_lens.StandardSAEConfig, "topk": sae_lens.TopKSAEConfig,
               "jumprelu": sae_lens.JumpReLUSAEConfig}[arch]
    kw = {"k": 5} if arch == "topk" else {}
    sae = sae_lens.SAE.from_dict(cfg_cls(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=apply_b_dec, **kw, **cfg_extra).to_dict())
    gen = torch.Generator().manual_seed(2 * ["standard", "topk", "jumprelu"].index(arch) + apply_b_dec)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if name == "threshold" else 1.0))
            if name == "threshold":
                p.abs_()
            if name == "b_dec":
                p.mul_(3)  # large enough that subtracting it or not changes every latent
    sae.save_model(str(dpath))
    return sae


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_latents_equal_saelens(tmp_path, arch, apply_b_dec):
    ref = _saelens_folder(tmp_path / "sae", arch, apply_b_dec)
    ours = load_sae(tmp_path / "sae")
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        z_ref = ref.encode(x)
        z = ours.encode(x)
        torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.decode(z), ref.decode(z_ref), rtol=1e-5, atol=1e-5)
    assert (z > 0).any()
    if arch == "standard":  # the miner's in-place encoder follows the folder's setting too
        from tools.topk import chunk_encoder

        out = torch.empty(4, 16, D_SAE)
        chunk_encoder(ours, x, 16)(0, 4, out)
        torch.testing.assert_close(out.reshape(64, D_SAE), z_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field,value", [("normalize_activations", "layer_norm"),
                                         ("normalize_activations", "expected_average_only_in"),
                                         ("reshape_activations", "hook_z")])
def test_unsupported_settings_are_refused_naming_the_field(tmp_path, field, value):
    _saelens_folder(tmp_path / "sae", "standard", True)
    cfg_fpath = tmp_path / "sae" / "cfg.json"
    cfg = json.loads(cfg_fpath.read_text())
    cfg[field] = value
    cfg_fpath.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=f"{field}.*{value}"):
        load_sae(tmp_path / "sae")


def test_rescale_by_decoder_norm_is_refused(tmp_path):
    _saelens_folder(tmp_path / "sae", "topk", True, rescale_acts_by_decoder_norm=True)
    with pytest.raises(UserError, match="rescale_acts_by_decoder_norm"):
        load_sae(tmp_path / "sae")
