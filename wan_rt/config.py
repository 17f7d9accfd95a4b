"""Every number that describes a Wan 2.2 model, in one place.

Values come from the official configs (Wan2.2 `wan/configs/wan_t2v_A14B.py`, `wan_i2v_A14B.py`,
`wan_ti2v_5B.py`, `shared_config.py`) and diffusers' `convert_wan_to_diffusers.py`. The tiny
specs used by tests and the default demo are *derived* from the real ones with
`dataclasses.replace`, so task wiring (channels, per-token timestep, experts, boundary) is never
typed twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Literal

Task = Literal["t2v", "i2v", "ti2v"]

# Official default negative prompt (Wan2.2 `wan/configs/shared_config.py: sample_neg_prompt`).
# Used whenever the user leaves the negative prompt empty on an official-layout checkpoint.
OFFICIAL_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class DiTConfig:
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_channels: int   # 16 noise (T2V) | 16 noise + 4 mask + 16 image latent (I2V) | 48 (TI2V)
    out_channels: int
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256          # sinusoidal timestep embedding width
    text_dim: int = 4096         # umT5-XXL hidden size
    text_len: int = 512          # context rows after zero-padding
    eps: float = 1e-6
    rope_max_seq_len: int = 1024  # positions per RoPE axis
    per_token_timestep: bool = False  # TI2V-5B: timestep is [B, L] (0 on a clean first frame)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    version: Literal["2.1", "2.2"]
    base_dim: int                # encoder width (96 for 2.1, 160 for 2.2)
    decoder_base_dim: int        # decoder width (96 for 2.1, 256 for 2.2)
    z_dim: int
    patch_size: int              # pixel patchify before the encoder (1 for 2.1, 2 for 2.2)
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    @property
    def stride(self) -> tuple[int, int, int]:
        """(time, height, width) compression from pixels to latents."""
        spatial = self.patch_size * 2 ** (len(self.dim_mult) - 1)
        return (2 ** sum(self.temporal_downsample), spatial, spatial)


@dataclass(frozen=True)
class TextEncoderConfig:
    """umT5-XXL encoder, in transformers' UMT5Config terms."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6


@dataclass(frozen=True)
class Stage:
    """One denoising phase. A stage runs while the timestep is >= `min_timestep`."""

    component: str     # "dit_high_noise" | "dit_low_noise" | "dit"
    min_timestep: float  # in train-timestep units (boundary x 1000); 0 for the last stage
    guide_scale: float


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: Task
    dit: DiTConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig
    stages: tuple[Stage, ...]    # ordered high noise -> low noise
    sample_steps: int
    sample_shift: float
    num_frames: int
    fps: int
    height: int                  # default size
    width: int
    sizes: tuple[tuple[int, int], ...]  # (height, width) the model was trained for

    @property
    def dit_components(self) -> tuple[str, ...]:
        return tuple(s.component for s in self.stages)

    @property
    def boundary(self) -> float | None:
        """Fraction of 1000 at which the high-noise expert hands over (None: one DiT)."""
        return self.stages[0].min_timestep / NUM_TRAIN_TIMESTEPS if len(self.stages) > 1 else None

    def stage_for(self, timestep: float) -> Stage:
        for stage in self.stages:
            if timestep >= stage.min_timestep:
                return stage
        return self.stages[-1]

    @property
    def spatial_multiple(self) -> int:
        """Height and width must be multiples of this: VAE stride x DiT patch."""
        return self.vae.stride[1] * self.dit.patch_size[1]


WAN21_VAE = VAEConfig(
    version="2.1", base_dim=96, decoder_base_dim=96, z_dim=16, patch_size=1,
    latents_mean=(-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                  0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921),
    latents_std=(2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160),
)

WAN22_VAE = VAEConfig(
    version="2.2", base_dim=160, decoder_base_dim=256, z_dim=48, patch_size=2,
    latents_mean=(-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
                  -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
                  -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
                  -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
                  -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
                  0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667),
    latents_std=(0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
                 0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
                 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
                 0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
                 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744),
)

UMT5_XXL = TextEncoderConfig()

_A14B_DIT = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40,
                      in_channels=16, out_channels=16)
_A14B_SIZES = ((720, 1280), (1280, 720), (480, 832), (832, 480))

T2V_A14B = ModelSpec(
    name="t2v-A14B", task="t2v", dit=_A14B_DIT, vae=WAN21_VAE, text_encoder=UMT5_XXL,
    # Official guide tuple is (low, high) = (3.0, 4.0); boundary 0.875.
    stages=(Stage("dit_high_noise", 875.0, 4.0), Stage("dit_low_noise", 0.0, 3.0)),
    sample_steps=40, sample_shift=12.0, num_frames=81, fps=16, height=720, width=1280,
    sizes=_A14B_SIZES,
)

I2V_A14B = ModelSpec(
    name="i2v-A14B", task="i2v", dit=dataclasses.replace(_A14B_DIT, in_channels=36),
    vae=WAN21_VAE, text_encoder=UMT5_XXL,
    stages=(Stage("dit_high_noise", 900.0, 3.5), Stage("dit_low_noise", 0.0, 3.5)),
    sample_steps=40, sample_shift=5.0, num_frames=81, fps=16, height=720, width=1280,
    sizes=_A14B_SIZES,
)

TI2V_5B = ModelSpec(
    name="ti2v-5B", task="ti2v",
    dit=DiTConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30,
                  in_channels=48, out_channels=48, per_token_timestep=True),
    vae=WAN22_VAE, text_encoder=UMT5_XXL,
    stages=(Stage("dit", 0.0, 5.0),),
    sample_steps=50, sample_shift=5.0, num_frames=121, fps=24, height=704, width=1280,
    sizes=((704, 1280), (1280, 704)),
)


def tiny(spec: ModelSpec) -> ModelSpec:
    """Same task, stages, channels and patching as `spec`; only widths, depths and sizes shrink."""
    text_encoder = TextEncoderConfig(vocab_size=256, d_model=32, d_kv=16, d_ff=64,
                                     num_layers=2, num_heads=2)
    dit = dataclasses.replace(spec.dit, dim=64, ffn_dim=128, num_heads=2, num_layers=2,
                              freq_dim=32, text_dim=text_encoder.d_model, text_len=16)
    # Widths stay multiples of 8 because the VAE's RMS norms and attention need >1 channel.
    vae = dataclasses.replace(spec.vae, base_dim=8, decoder_base_dim=8 if spec.vae.version == "2.1" else 16,
                              num_res_blocks=1)
    # Smallest size that keeps two DiT tokens per axis after the VAE stride and patch.
    side = 2 * spec.vae.stride[1] * spec.dit.patch_size[1]
    return dataclasses.replace(
        spec, name=f"tiny-{spec.name}", dit=dit, vae=vae, text_encoder=text_encoder,
        sample_steps=4, num_frames=5, height=side, width=side, sizes=((side, side),),
    )


SPECS: dict[str, ModelSpec] = {s.name: s for s in (T2V_A14B, I2V_A14B, TI2V_5B)}
SPECS |= {t.name: t for t in (tiny(s) for s in list(SPECS.values()))}
DEFAULT_SPEC = "tiny-t2v-A14B"


def get_spec(name: str) -> ModelSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(SPECS)}") from None


def latent_shape(spec: ModelSpec, height: int, width: int, num_frames: int) -> tuple[int, int, int, int]:
    """[C, T, H, W] of the latent for a video of `num_frames` x `height` x `width` pixels."""
    st, sh, sw = spec.vae.stride
    return (spec.vae.z_dim, (num_frames - 1) // st + 1, height // sh, width // sw)


class RequestError(ValueError):
    """A request a model cannot take: one line; `field` names the request field it is about
    ("size", "num_frames", "num_inference_steps": the server's `param`)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def check_request(spec: ModelSpec, height: int, width: int, num_frames: int, steps: int) -> None:
    """One clear RequestError per bad argument (the CLI prints it as one line, the server as a 400)."""
    m = spec.spatial_multiple
    if height <= 0 or width <= 0 or height % m or width % m:
        raise RequestError(f"width and height must be positive multiples of {m} for {spec.name}; "
                           f"got width {width}, height {height}", "size")
    if num_frames < 1 or (num_frames - 1) % spec.vae.stride[0]:
        raise RequestError(f"num_frames must be 4k+1 (1, 5, 9, ..., 81); got {num_frames}", "num_frames")
    if steps < 1:
        raise RequestError(f"num_inference_steps must be >= 1; got {steps}", "num_inference_steps")


def token_grid(spec: ModelSpec, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
    _, t, h, w = latent_shape(spec, height, width, num_frames)
    pt, ph, pw = spec.dit.patch_size
    return (t // pt, h // ph, w // pw)


def seq_len(spec: ModelSpec, height: int, width: int, num_frames: int) -> int:
    """DiT tokens: 1280x720x81 on A14B -> 21x45x80 = 75,600."""
    f, h, w = token_grid(spec, height, width, num_frames)
    return f * h * w


def spec_hash(spec: ModelSpec) -> str:
    """Stable identity of a spec; goes into every engine manifest."""
    blob = json.dumps(dataclasses.asdict(spec), sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()
