"""The pipeline: encode text -> denoise through the expert stages (CFG) -> decode.

Mirrors the official `wan/text2video.py`, `image2video.py`, `textimage2video.py` and diffusers'
`WanPipeline` / `WanImageToVideoPipeline` / `WanVideoToVideoPipeline` (same keywords, same
meaning; video-to-video's `latents` is the noise the source is mixed with, see __call__). The
loop talks to components only through the named-tensor contract (runtime/component.py), so it
is identical for every backend.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from wan_rt.config import ModelSpec, Stage, check_request, latent_shape
from wan_rt.models.text_encoder import tokenize
from wan_rt.runtime.component import Component
from wan_rt.runtime.residency import ExpertResidency
from wan_rt.scheduler import (SamplingDefaults, make_scheduler, scheduler_from_diffusers_config,
                              scheduler_from_timesteps)
from wan_rt.video import (ImageInput, VideoInput, VideoInputError, frames_to_output, image_to_tensor, load_video,
                          video_to_output, video_to_tensor)

DEFAULT_STRENGTH = 0.8  # diffusers' WanVideoToVideoPipeline default


class ExtensionUnsupported(ValueError):
    """The model cannot continue a clip: extension conditions on the last frame (I2V, TI2V)."""


def check_extendable(spec: ModelSpec) -> None:
    """ExtensionUnsupported (one line) for a model without image conditioning (T2V-A14B)."""
    if spec.task == "t2v":
        raise ExtensionUnsupported(f"{spec.name} is a text-to-video model and cannot extend a video: extension "
                                   "continues from the last frame, which needs an image-conditioned model (i2v, ti2v)")


def strength_start(steps: int, strength: float) -> int:
    """The first step video-to-video runs: diffusers' get_timesteps (the last int(steps * strength)
    steps run; strength 1 runs them all, from pure noise)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1]; got {strength}")
    run = min(int(steps * strength), steps)
    if run == 0:
        raise ValueError(f"strength {strength} of {steps} steps runs no step; raise strength or the step count")
    return steps - run


def source_frame_count(available: int, num_frames: Optional[int]) -> int:
    """Frames of a source video that video-to-video uses: num_frames of them (the first), or by
    default as many as it has, trimmed to 4k+1 (the VAE encodes frame 0, then groups of 4)."""
    if num_frames is None:
        return (available - 1) // 4 * 4 + 1
    if num_frames > available:
        raise VideoInputError(f"video has {available} frames; num_frames={num_frames} needs at least that many")
    return num_frames


class GenerationInterrupted(Exception):
    """Raised at a step boundary when `pipe.interrupt` was set or a step callback raised it:
    the generation stops there, nothing is decoded, and the pipeline is ready for the next call."""


# The diffusers step-callback signature: (pipe, step_index, timestep, callback_kwargs) -> dict.
# callback_kwargs holds the tensors named in `callback_on_step_end_tensor_inputs`; a returned
# "latents" replaces the loop's latents.
StepCallback = Callable[["Pipeline", int, Tensor, dict[str, Tensor]], Optional[dict[str, Tensor]]]
CALLBACK_TENSORS = ("latents",)


@dataclass
class _Conditions:
    """What every denoising step is conditioned on, fixed for the whole call."""

    context: Tensor                      # [B, S, D]
    context_null: Optional[Tensor]       # the negative prompt's, when some stage uses CFG
    context_pair: Optional[Tensor]       # [context; context_null]: CFG as one batch of two
    image: Optional[Tensor]              # I2V: mask + image latents channels; TI2V: frame-0 latent
    first_frame_mask: Optional[Tensor]   # TI2V: 0 on the clean first latent frame
    guide: dict[str, float]              # CFG scale per DiT component


@dataclass
class WanPipelineOutput:
    frames: Any                    # np [B, F, H, W, 3] | pt [B, F, 3, H, W] | pil | latents
    # Seconds per stage; plus what components report about their stage ("<component>.<figure>",
    # e.g. a step cache's steps computed / reused) and, on a GPU, "peak_gpu_memory_gb".
    timings: dict[str, float] = field(default_factory=dict)
    steps_per_stage: dict[str, int] = field(default_factory=dict)


class Pipeline:
    """The denoise loop over ready components (named tensors in and out, any backend). It loads
    nothing: `wan_rt.WanPipeline.from_pretrained` (wan_rt/loader.py) assembles one from a
    checkpoint or an engines dir."""

    def __init__(self, spec: ModelSpec, components: Mapping[str, Component], tokenizer,
                 defaults: SamplingDefaults, device: Union[str, torch.device] = "cpu"):
        self.spec = spec
        self.components = dict(components)
        self.tokenizer = tokenizer
        self.defaults = defaults
        self.device = torch.device(device)
        self.progress = True
        # Cond and uncond as one batch of two: identical math, half the calls (engine profiles
        # are built for batch 1-2, so this applies to single-prompt generations).
        self.cfg_batch = True
        self.residency = ExpertResidency(self.components, spec.dit_components, _expert_budget(self.device, components))
        # Set from any thread to stop the current generation at its next step boundary
        # (GenerationInterrupted); cleared when a call starts.
        self.interrupt = False
        self.num_timesteps = 0  # steps of the current (or last) call, as diffusers exposes it
        # Prompts are padded to this many tokens unless a call says otherwise: the model's own
        # length, or the one its engines were built for (components built for a fixed text
        # length say so in `text_len`: `wan-rt build --text-len`).
        served = {int(c.text_len) for c in self.components.values() if getattr(c, "text_len", None)}
        self.text_len = min(served) if served else spec.dit.text_len

    def set_progress_bar_config(self, disable: bool = False) -> None:
        self.progress = not disable

    # ------------------------------------------------------------------ text
    def encode_prompt(self, prompts: Union[str, list[str]], max_sequence_length: Optional[int] = None) -> Tensor:
        """-> context [B, max_sequence_length, D], zero past each prompt's true length."""
        max_sequence_length = max_sequence_length or self.text_len
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        input_ids, mask = tokenize(self.tokenizer, prompts, max_sequence_length)
        return self.components["text_encoder"](input_ids=input_ids, attention_mask=mask)["context"]

    # ------------------------------------------------------------------ main call
    def __call__(self, prompt: Union[str, list[str]], negative_prompt: Optional[Union[str, list[str]]] = None,
                 image: Optional[ImageInput] = None, height: Optional[int] = None, width: Optional[int] = None,
                 num_frames: Optional[int] = None, num_inference_steps: Optional[int] = None,
                 guidance_scale: Optional[float] = None, guidance_scale_2: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, latents: Optional[Tensor] = None,
                 max_sequence_length: Optional[int] = None, output_type: str = "np",
                 shift: Optional[float] = None, solver: Optional[str] = None,
                 callback_on_step_end: Optional[StepCallback] = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = CALLBACK_TENSORS,
                 timesteps: Optional[Sequence[int]] = None, switch_step: Optional[int] = None,
                 video: Optional[VideoInput] = None, strength: Optional[float] = None) -> WanPipelineOutput:
        """`callback_on_step_end` follows diffusers: called after every denoising step with
        (pipe, step_index, timestep, {name: tensor}); it may return {"latents": ...} to replace
        them, and may raise GenerationInterrupted (or set `pipe.interrupt`) to stop the run.

        Few-step distilled models: `timesteps` (e.g. [1000, 750, 500, 250]) samples at exactly
        those training timesteps (scheduler.scheduler_from_timesteps, the formulation of LightX2V's
        distill configs; `shift` applies, `solver` must be left out), and `switch_step` hands over
        from the high-noise to the low-noise expert at that step index instead of at the boundary
        timestep (LightX2V's `boundary_step_index`). Guidance 1 runs one pass per step (no
        negative prompt, no uncond batch).

        Video-to-video (diffusers' WanVideoToVideoPipeline): `video` (frames, an mp4's path or
        bytes; resized as an image input is) is encoded, noised to the sigma of the first step
        that runs, and denoised by the last int(steps * strength) steps, each by the expert its
        timestep belongs to (strength default 0.8). `latents` / `generator` give the noise it is
        mixed with (diffusers takes `latents` as the already-noised start instead); strength 1
        is text-to-video from that noise. `num_frames` defaults to the source's length (trimmed
        to 4k+1). An i2v model without `image` conditions on the source's first frame."""
        spec = self.spec
        source = None
        if video is not None:
            source = load_video(video)
            num_frames = source_frame_count(len(source), num_frames)
            if image is None and spec.task == "i2v":
                image = source[0]
        elif strength is not None:
            raise ValueError("strength applies to video-to-video: pass video too")
        unknown = [n for n in callback_on_step_end_tensor_inputs if n not in CALLBACK_TENSORS]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {unknown[0]!r} is not one of {list(CALLBACK_TENSORS)}")
        self.interrupt = False
        height = spec.height if height is None else height
        width = spec.width if width is None else width
        num_frames = spec.num_frames if num_frames is None else num_frames
        if timesteps is not None:
            if solver is not None:
                raise ValueError("timesteps run the distilled models' Euler sampler; leave solver out")
            if num_inference_steps is not None and num_inference_steps != len(timesteps):
                raise ValueError(f"num_inference_steps={num_inference_steps} but {len(timesteps)} timesteps given")
            num_inference_steps = len(timesteps)
        steps = spec.sample_steps if num_inference_steps is None else num_inference_steps
        check_request(spec, height, width, num_frames, steps)
        sched = self._scheduler(steps, shift, solver, timesteps)
        start = 0 if source is None else strength_start(len(sched.timesteps), DEFAULT_STRENGTH if strength is None
                                                        else strength)
        groups = _group_by_stage(spec, sched.timesteps, switch_step, start)
        sched.start_at(start)
        if spec.task == "i2v" and image is None:
            raise ValueError(f"{spec.name} is an image-to-video model: pass an image")
        if output_type not in ("np", "pt", "pil", "latent"):
            raise ValueError(f"output_type must be one of np, pt, pil, latent; got {output_type!r}")
        guide = self._guide_scales(guidance_scale, guidance_scale_2)
        # The text length the DiT was trained with (512; 16 for tiny presets) unless asked otherwise.
        max_sequence_length = max_sequence_length or self.text_len
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        if negative_prompt is None:
            negative_prompt = self.defaults.negative_prompt
        negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
        timings: dict[str, float] = {}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        # 1. Text: prompt and negative prompt, each zero-padded to max_sequence_length.
        with _timed(timings, "text_encoder"):
            context = self.encode_prompt(prompts, max_sequence_length)
            needs_cfg = any(g > 1.0 for g in guide.values())
            context_null = self.encode_prompt(negatives, max_sequence_length) if needs_cfg else None

        # 2. Noise, and the image condition where the task has one.
        shape = (batch, *latent_shape(spec, height, width, num_frames))
        if latents is None:
            gen_device = generator.device if generator is not None else torch.device("cpu")
            latents = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {list(shape)}; got {list(latents.shape)}")
        latents = latents.to(self.device, torch.float32)
        if source is not None and start > 0:  # x = (1 - σ)·x0 + σ·noise at the first step that runs
            with _timed(timings, "vae_encoder"):
                pixels = video_to_tensor(source[:num_frames], height, width).to(self.device)
                z = self.components["vae_encoder"](video=pixels)["latents"].to(self.device, torch.float32)
            sigma = sched.sigmas[start].to(self.device)
            latents = (1 - sigma) * z + sigma * latents
        condition = None
        if image is not None:
            with _timed(timings, "vae_encoder"):
                condition = self._image_condition(image, batch, height, width, num_frames)
        first_frame_mask = self._first_frame_mask(latents, condition)

        # 3. Denoise: the stages run in order (timesteps decrease), each expert exactly once.
        steps_per_stage: dict[str, int] = {}
        # One tensor for the whole loop, so components can cache per-prompt work on it.
        batched = self.cfg_batch and batch == 1 and context_null is not None
        context_pair = torch.cat([context, context_null]) if batched else None
        self.num_timesteps = len(sched.timesteps) - start
        cond = _Conditions(context, context_null, context_pair, condition, first_frame_mask, guide)
        try:
            latents = self._denoise(groups, sched, latents, cond, steps_per_stage, timings,
                                    callback_on_step_end, callback_on_step_end_tensor_inputs, start)
        finally:
            self.residency.finish()  # no background load outlives the call, interrupted or not
        if first_frame_mask is not None and condition is not None:  # TI2V: frame 0 is the image latent
            latents = (1 - first_frame_mask) * condition + first_frame_mask * latents

        # 4. Decode.
        frames = latents
        if output_type != "latent":
            with _timed(timings, "vae_decoder"):
                frames = video_to_output(self.components["vae_decoder"](latents=latents)["video"], output_type)
        if self.device.type == "cuda":
            timings["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return WanPipelineOutput(frames, timings, steps_per_stage)

    def extend(self, video: VideoInput, prompt: Union[str, list[str]], num_frames: Optional[int] = None,
               output_type: str = "np", **kwargs: Any) -> WanPipelineOutput:
        """Continue a clip: an image-to-video run of `num_frames` (4k+1; default: the model's)
        conditioned on the source's last frame, appended to the source (resized to the request's
        size) without repeating that seam frame: len(source) + num_frames - 1 frames. Takes
        __call__'s keywords (prompt, seed, steps, size...). I2V-A14B and TI2V-5B only
        (ExtensionUnsupported otherwise)."""
        check_extendable(self.spec)
        clash = sorted({"image", "video", "strength"} & set(kwargs))
        if clash:
            raise ValueError(f"extend conditions on the source's last frame; {clash[0]} does not apply")
        if output_type not in ("np", "pt", "pil"):
            raise ValueError(f"extend returns frames: output_type must be one of np, pt, pil; got {output_type!r}")
        source = load_video(video)
        out = self(prompt, image=source[-1], num_frames=num_frames, output_type="pt", **kwargs)
        new = out.frames  # [B, F, 3, H, W] in [0, 1]
        height, width = new.shape[-2:]
        head = video_to_output(video_to_tensor(source, height, width), "pt").to(new.device)
        frames = torch.cat([head.expand(len(new), -1, -1, -1, -1), new[:, 1:]], dim=1)
        return WanPipelineOutput(frames_to_output(frames, output_type), out.timings, out.steps_per_stage)

    def _denoise(self, groups: list[tuple[Stage, list[int]]], sched, latents: Tensor, cond: _Conditions,
                 steps_per_stage: dict[str, int], timings: dict[str, float], callback: Optional[StepCallback],
                 callback_tensors: Sequence[str], start: int = 0) -> Tensor:
        """The stages in order (timesteps decrease), each expert exactly once. Steps before
        `start` (video-to-video) are not in `groups`; callbacks count from the first that runs."""
        for n_stage, (stage, indices) in enumerate(groups):
            upcoming = groups[n_stage + 1][0].component if n_stage + 1 < len(groups) else None
            dit = self.components[stage.component]
            g = cond.guide[stage.component]
            steps_per_stage[stage.component] = len(indices)
            # Making the first expert resident is loading; waiting for the next one is the swap stall.
            with _timed(timings, "swap_stall" if n_stage else "expert_load"):
                self.residency.enter(stage.component)
            # Optional stage hooks (runtime/component.py): a component wrapped with per-generation
            # state (a step cache) starts afresh here and reports on its stage afterwards.
            if hasattr(dit, "begin_stage"):
                dit.begin_stage(indices, len(sched.timesteps))
            with _timed(timings, stage.component):
                for k, i in enumerate(self._progress(indices, stage.component)):
                    t = sched.timesteps[i]
                    model_in, timestep = self._model_input(latents, cond.image, cond.first_frame_mask, t)
                    if g > 1.0 and cond.context_pair is not None:
                        v, v_null = dit(latents=model_in.expand(2, *model_in.shape[1:]),
                                        timestep=timestep.expand(2, *timestep.shape[1:]),
                                        context=cond.context_pair)["noise_pred"].chunk(2)
                        v = v_null + g * (v - v_null)
                    else:
                        v = dit(latents=model_in, timestep=timestep, context=cond.context)["noise_pred"]
                        if g > 1.0:
                            v_null = dit(latents=model_in, timestep=timestep, context=cond.context_null)["noise_pred"]
                            v = v_null + g * (v - v_null)
                    latents = sched.step(v, i, latents)
                    self.residency.progress(stage.component, len(indices) - k - 1, upcoming)
                    if callback is not None:
                        local = {"latents": latents}
                        returned = callback(self, i - start, t, {n: local[n] for n in callback_tensors}) or {}
                        latents = returned.get("latents", latents)
                    if self.interrupt:
                        raise GenerationInterrupted(f"interrupted after step {i - start + 1} of {self.num_timesteps}")
            if hasattr(dit, "stage_report"):
                timings.update({f"{stage.component}.{k}": v for k, v in dit.stage_report().items()})
            self.residency.leave(stage.component)
        return latents

    # ------------------------------------------------------------------ helpers
    def _scheduler(self, steps: int, shift: Optional[float], solver: Optional[str],
                   timesteps: Optional[Sequence[int]] = None):
        """The checkpoint's own scheduler config when there is one and the solver is not
        overridden; the few-step sampler at an explicit timestep list."""
        if timesteps is not None:
            return scheduler_from_timesteps(timesteps, shift if shift is not None else self.defaults.shift)
        if self.defaults.scheduler_config is not None and solver in (None, self.defaults.solver):
            return scheduler_from_diffusers_config(self.defaults.scheduler_config, steps, shift_override=shift)
        return make_scheduler(solver or self.defaults.solver, steps,
                              shift if shift is not None else self.defaults.shift, self.defaults.grid)

    def _guide_scales(self, high: Optional[float], low: Optional[float]) -> dict[str, float]:
        return guide_scales(self.spec, high, low)

    def _image_condition(self, image: ImageInput, batch: int, height: int, width: int, num_frames: int) -> Tensor:
        pixels = image_to_tensor(image, height, width).to(self.device)  # [1, 3, H, W]
        encoder = self.components["vae_encoder"]
        if self.spec.task == "ti2v":
            # TI2V: the image latent becomes latent frame 0; the model keeps it clean.
            z = encoder(video=pixels[:, :, None])["latents"].to(self.device)
            return z.expand(batch, -1, -1, -1, -1)
        # I2V-A14B: encode [image, zeros...] and prepend a 4-channel first-frame mask.
        video = torch.cat([pixels[:, :, None], pixels.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
        z = encoder(video=video)["latents"].to(self.device)  # the encoder may run elsewhere (the CPU)
        _, _, t, h, w = z.shape
        st = self.spec.vae.stride[0]
        mask = torch.zeros(1, 1, num_frames + st - 1, h, w, device=z.device)
        mask[:, :, :st] = 1  # pixel frame 0 repeated `st` times so frames group into latent frames
        mask = mask.view(1, t, st, h, w).transpose(1, 2)  # [1, 4, T, h, w]
        return torch.cat([mask, z], dim=1).expand(batch, -1, -1, -1, -1)

    def _first_frame_mask(self, latents: Tensor, condition: Optional[Tensor]) -> Optional[Tensor]:
        if self.spec.task != "ti2v":
            return None
        mask = torch.ones(1, 1, *latents.shape[2:], device=latents.device)
        if condition is not None:
            mask[:, :, 0] = 0
        return mask

    def _model_input(self, latents: Tensor, condition: Optional[Tensor], first_frame_mask: Optional[Tensor],
                     t: Tensor) -> tuple[Tensor, Tensor]:
        batch = latents.shape[0]
        t = t.to(self.device, torch.float32)
        if first_frame_mask is None:
            model_in = latents if condition is None else torch.cat([latents, condition], dim=1)
            return model_in, t.expand(batch)
        # TI2V: per-token timestep, 0 on the clean first frame (patch stride 2 in H and W).
        model_in = latents if condition is None else (1 - first_frame_mask) * condition + first_frame_mask * latents
        ph, pw = self.spec.dit.patch_size[1:]
        per_token = (first_frame_mask[0, 0][:, ::ph, ::pw] * t).flatten()
        return model_in, per_token[None].expand(batch, -1)

    def _progress(self, indices: list[int], desc: str) -> Iterator[int]:
        if not self.progress:
            return iter(indices)
        from tqdm.auto import tqdm

        return iter(tqdm(indices, desc=desc, leave=False))


def guide_scales(spec: ModelSpec, high: Optional[float], low: Optional[float]) -> dict[str, float]:
    """CFG scale per DiT component: guidance_scale drives the first (high-noise) stage,
    guidance_scale_2 the second, as in diffusers; with neither given each stage uses the spec's."""
    stages = spec.stages
    if high is None:
        out = {s.component: s.guide_scale for s in stages}
        if low is not None and len(stages) > 1:
            out[stages[1].component] = low
        return out
    out = {stages[0].component: high}
    if len(stages) > 1:
        out[stages[1].component] = high if low is None else low
    return out


def _expert_budget(device: torch.device, components: Mapping[str, Component]) -> Optional[int]:
    """GPU memory the experts may use together: the card less the other components and an
    activation reserve (the larger of 15% and 24 GiB: A14B at 720p with CFG as a batch of two
    needs several GiB per block). None (no limit) off the GPU. WAN_RT_EXPERT_BUDGET_GB overrides."""
    import os

    if os.environ.get("WAN_RT_EXPERT_BUDGET_GB"):
        return int(float(os.environ["WAN_RT_EXPERT_BUDGET_GB"]) * 2**30)
    if device.type != "cuda":
        return None
    others = sum(int(getattr(c, "nbytes", 0) or 0) for n, c in components.items() if not n.startswith("dit"))
    total = torch.cuda.get_device_properties(device).total_memory
    return total - max(int(total * 0.15), 24 * 2**30) - others


def _group_by_stage(spec: ModelSpec, timesteps: Tensor, switch_step: Optional[int] = None,
                    start: int = 0) -> list[tuple[Stage, list[int]]]:
    """Consecutive step indices per stage from step `start` on (video-to-video skips the first);
    timesteps decrease, so each stage appears once. With `switch_step` the second stage starts at
    that step index whatever the timesteps."""
    n = len(timesteps)
    if switch_step is not None:
        check_switch_step(spec, n, switch_step)
        split = ((spec.stages[0], list(range(start, switch_step))),
                 (spec.stages[1], list(range(max(start, switch_step), n))))
        return [(stage, indices) for stage, indices in split if indices]
    groups: list[tuple[Stage, list[int]]] = []
    for i, t in enumerate(timesteps.tolist()[start:], start):
        stage = spec.stage_for(t)
        if groups and groups[-1][0] == stage:
            groups[-1][1].append(i)
        else:
            groups.append((stage, [i]))
    return groups


def check_switch_step(spec: ModelSpec, steps: int, switch_step: int) -> None:
    """One clear ValueError for an expert switch by step index that cannot happen."""
    if len(spec.stages) < 2:
        raise ValueError(f"switch_step: {spec.name} has one DiT, there is no expert to switch to")
    if not 0 <= switch_step <= steps:
        raise ValueError(f"switch_step must be in 0..{steps} (the number of steps); got {switch_step}")


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
