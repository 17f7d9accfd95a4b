"""The embedded tiny presets: random weights made on the spot, so wan_rt runs on a fresh machine.

`tiny-t2v-A14B`, `tiny-i2v-A14B` and `tiny-ti2v-5B` have the real models' wiring (channels,
experts, boundary, per-token timestep) at toy width. Their weights are seeded random numbers
(they generate noise, not video), written once in the diffusers layout under the cache folder,
built with wan_rt's own modules (no diffusers needed), with a sentencepiece tokenizer trained
offline on a small built-in corpus.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from wan_rt.config import ModelSpec, get_spec, spec_hash
from wan_rt.models import hf_config

# Bump when the on-disk format of a tiny preset changes, so stale caches are regenerated.
_FORMAT = 2  # 2: the tokenizer converted from spiece.model faithfully
_WORDS = (
    "a the of in on at with and under over near by cat dog bird fish horse fox astronaut robot girl boy "
    "woman man child dancer surfer chef knight dragon car train boat ship plane bicycle city forest beach "
    "ocean river mountain desert snow rain sunset sunrise night morning street market garden kitchen "
    "castle space moon stars clouds waves fire light shadow neon red blue green golden white black slow "
    "fast walking running flying swimming jumping dancing cooking riding playing looking smiling camera "
    "pans zooms tracks close wide shot cinematic realistic painting style detailed soft warm cold bright "
    "dark misty quiet busy tiny huge old young happy calm wild 4k film grain slow motion lens flare"
).split()


def cache_root() -> Path:
    env = os.environ.get("WAN_RT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wan_rt"


def is_tiny_preset(name: str) -> bool:
    return name.startswith("tiny-")


def ensure_tiny_checkpoint(name: str) -> Path:
    """Folder of the tiny preset `name`, written on first use (atomically) and reused after."""
    spec = get_spec(name)
    if not is_tiny_preset(name):
        raise ValueError(f"{name} has no embedded weights; pass the path of a downloaded checkpoint")
    folder = cache_root() / "presets" / f"{name}-v{_FORMAT}-{spec_hash(spec)[:12]}"
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        write_tiny_checkpoint(spec, tmp)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "model_index.json").is_file():  # not a concurrent writer's win
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_tiny_checkpoint(spec: ModelSpec, folder: Path, seed: int = 0) -> None:
    """Diffusers layout: model_index.json, transformer[_2]/, vae/, text_encoder/, tokenizer/, scheduler/."""
    from safetensors.torch import save_file

    from wan_rt.models.dit import WanDiT
    from wan_rt.models.text_encoder import build_umt5_encoder
    from wan_rt.models.vae import WanVAE

    folder.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(folder / "tokenizer", spec.text_encoder.vocab_size)

    torch.manual_seed(seed)
    encoder = build_umt5_encoder(hf_config.text_encoder_to_hf(spec.text_encoder))
    _perturb(encoder)
    (folder / "text_encoder").mkdir()
    encoder.config.save_pretrained(folder / "text_encoder")
    # The input embedding is tied to `shared.weight`; transformers saves only the latter too.
    weights = {k: v for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(_contiguous(weights), folder / "text_encoder" / "model.safetensors")

    # diffusers names the high-noise expert `transformer` and the low-noise one `transformer_2`.
    for index, stage in enumerate(spec.stages):
        torch.manual_seed(seed + 1 + index)
        dit = WanDiT(spec.dit)
        _perturb(dit)
        sub = folder / ("transformer" if index == 0 else "transformer_2")
        sub.mkdir()
        _write_json(sub / "config.json", hf_config.dit_to_diffusers(spec.dit))
        save_file(_contiguous(dit.state_dict()), sub / "diffusion_pytorch_model.safetensors")

    torch.manual_seed(seed + 10)
    vae = WanVAE(spec.vae)
    _perturb(vae)
    (folder / "vae").mkdir()
    _write_json(folder / "vae" / "config.json", hf_config.vae_to_diffusers(spec.vae))
    save_file(_contiguous(vae.state_dict()), folder / "vae" / "diffusion_pytorch_model.safetensors")

    (folder / "scheduler").mkdir()
    _write_json(folder / "scheduler" / "scheduler_config.json", {
        "_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000, "solver_order": 2,
        "prediction_type": "flow_prediction", "predict_x0": True, "solver_type": "bh2",
        "lower_order_final": True, "disable_corrector": [], "use_flow_sigmas": True,
        "flow_shift": spec.sample_shift, "final_sigmas_type": "zero", "timestep_spacing": "linspace",
    })
    two_experts = len(spec.stages) > 1
    _write_json(folder / "model_index.json", {
        "_class_name": "WanImageToVideoPipeline" if spec.task == "i2v" else "WanPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"] if two_experts else [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "boundary_ratio": spec.boundary,
        "expand_timesteps": spec.dit.per_token_timestep,
        **({"image_encoder": [None, None], "image_processor": [None, None]} if spec.task == "i2v" else {}),
        "wan_rt_preset": spec.name,
    })


def _perturb(module: torch.nn.Module) -> None:
    """Default inits leave norms at 1 and some tables at 0; give every tensor some signal so the
    tiny model is not degenerate (and a wrong wiring cannot hide behind zeros)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    import sentencepiece as spm
    from transformers import T5Tokenizer

    # A deterministic corpus: every word, then word pairs, so unigram training finds pieces.
    sentences = [" ".join(_WORDS[i: i + 7]) for i in range(len(_WORDS))]
    sentences += [f"{a} {b}" for a in _WORDS[::3] for b in _WORDS[1::5]]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        num_threads=1, minloglevel=2,
    )
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    # from_pretrained on the folder converts spiece.model faithfully (its pieces and scores, pad 0,
    # EOS 1, unk 2). `T5Tokenizer(vocab_file=...)` does not on transformers 5: it builds a
    # 4-token vocabulary that maps every word to the same two ids.
    T5Tokenizer.from_pretrained(str(folder), extra_ids=0).save_pretrained(folder)


def _contiguous(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state_dict.items()}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
